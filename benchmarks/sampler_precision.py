"""Pair precision of the semantic sampler on real images, by threshold.

Bootstraps a sampler as the pipeline does when no pre-trained encoder is given: a short plain
SimCLR pretraining on the train split, then embeds the train split with it and mines; prints the
pair-precision table (share of pairs whose two images share a label) for lower thresholds.
Labels never choose pairs; they only score them.

    python benchmarks/sampler_precision.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --epochs 3 --backbone resnet18 --no-cifar-stem
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from sepp_ray.data.ingest import ImageOptions, ingest
from sepp_ray.data.sources import open_source
from sepp_ray.mining.command import mine_command
from sepp_ray.mining.encoder import EncoderConfig
from sepp_ray.mining.mine import MineConfig
from sepp_ray.storage import read_manifest
from sepp_ray.train.driver import PretrainConfig, pretrain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sepp-precision"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--no-cifar-stem", action="store_true")
    ap.add_argument("--k", type=float, default=0.2, help="anchor fraction")
    ap.add_argument("--m", type=int, default=1)
    args = ap.parse_args()
    work = Path(args.workdir)
    images = str(work / "cifar10")
    timings: dict[str, float] = {}
    try:
        read_manifest(images)
    except Exception:
        from benchmarks.ingest import unpack

        root = unpack(Path(args.data), work / "raw")
        t = time.perf_counter()
        ingest(open_source(str(root)), images, ImageOptions(), overwrite=True)
        timings["ingest_s"] = time.perf_counter() - t
    stem = not args.no_cifar_stem
    t = time.perf_counter()
    run = pretrain(
        PretrainConfig(
            dataset=images,
            out=str(work / f"simclr-{args.backbone}-e{args.epochs}"),
            backbone=args.backbone,
            cifar_stem=stem,
            epochs=args.epochs,
            batch_size=args.batch,
            warmup_epochs=1,
            checkpoint_every=args.epochs,
            knn_every=args.epochs,
            overwrite=True,
            base_lr=0.6,
            shuffle_buffer=5000,
        )
    )
    timings["pretrain_s"] = time.perf_counter() - t
    t = time.perf_counter()
    m = mine_command(
        images,
        str(work / "pairs"),
        EncoderConfig(checkpoint=run["final_checkpoint"]),
        MineConfig(lo=0.5, hi=0.999, k=args.k, m=args.m),
        splits=["train"],
        actors=None,
        overwrite=True,
        config={},
    )
    timings["mine_s"] = time.perf_counter() - t
    print(
        f"machine: {platform.node()} {os.cpu_count()} CPUs; encoder: SimCLR {args.backbone} "
        f"(cifar_stem={stem}) {args.epochs} epochs, kNN top-1 "
        f"{run['final_metrics'].get('knn_top1')}; N={m['n']}, K={m['k']}, m={args.m}"
    )
    print("timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    print("| lower threshold | pairs | anchors with a positive | pair precision |")
    print("|---|---|---|---|")
    for r in m["threshold_curve"]:
        if r["lo"] >= 0.8:
            print(
                f"| {r['lo']} | {r['pairs']} | {r['anchors_with_positive']} | "
                f"{r.get('precision')} |"
            )


if __name__ == "__main__":
    main()
