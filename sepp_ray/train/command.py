"""`sepp pretrain`'s entry point: run the Ray Train driver, print the run's headline."""

from __future__ import annotations

from sepp_ray.console import say
from sepp_ray.train.driver import PretrainConfig


def run_pretrain(c: PretrainConfig) -> int:
    from sepp_ray.train.driver import pretrain

    m = pretrain(c)
    fm = m.get("final_metrics") or {}
    knn = f", kNN top-1 {fm['knn_top1']:.3f}" if "knn_top1" in fm else ""
    say(
        f"pretrained {c.method} for {m['epochs']} epochs ({m['items']}) in "
        f"{m['wall_seconds']:.0f} s{knn}; data {m['data_plane']['mode']} "
        f"({m['data_plane']['reason']}); checkpoint: {m['final_checkpoint']}"
    )
    return 0
