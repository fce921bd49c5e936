"""kNN and linear probe on synthetic features: separable data is solved, random labels are not,
and the kNN vote matches a direct per-query computation of the InstDisc protocol."""

from __future__ import annotations

import math

import pytest
import torch

from sepp_ray.errors import SeppError
from sepp_ray.eval.linear import LinearProbeConfig, linear_probe
from sepp_ray.eval.tables import ablation_table, headline, metrics_table
from sepp_ray.models.knn import knn_classify, knn_scores, topk_accuracy

C, D = 10, 32


def blobs(n: int, seed: int, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features around 10 fixed class centres (centres from seed 0, samples from ``seed``)."""
    centres = torch.randn(C, D, generator=torch.Generator().manual_seed(0)) * spread
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    return centres[y] + torch.randn(n, D, generator=g), y


def noise(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


def reference_knn(train: torch.Tensor, labels: torch.Tensor, q: torch.Tensor, k: int, t: float):
    """One query at a time, straight from the definition (Wu et al. arXiv 1805.01978, eq. 4)."""
    out = torch.zeros(q.shape[0], C, dtype=torch.float64)
    tn = train.double() / train.double().norm(dim=1, keepdim=True)
    for i in range(q.shape[0]):
        qi = q[i].double() / q[i].double().norm()
        sims = tn @ qi
        order = sorted(range(len(sims)), key=lambda j: -float(sims[j]))[:k]
        for j in order:
            out[i, int(labels[j])] += math.exp(float(sims[j]) / t)
        out[i] /= out[i].sum()
    return out


def test_knn_scores_match_the_definition_in_any_chunking() -> None:
    x, y = noise(60, 1)
    q, _ = noise(13, 2)
    ref = reference_knn(x, y, q, k=7, t=0.1)
    for chunk in (None, 1, 5):
        got = knn_scores(x, y, q, C, k=7, temperature=0.1, chunk=chunk)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_knn_separable_is_solved_and_random_labels_are_chance() -> None:
    x, y = blobs(2000, 1)
    tx, ty = blobs(1000, 2)
    res = knn_classify(x, y, tx, ty, C, k=20)
    assert res["top1"] > 0.99 and res["top5"] > 0.99
    rx, ry = noise(2000, 3)
    rtx, rty = noise(1000, 4)
    chance = knn_classify(rx, ry, rtx, rty, C, k=20)
    assert abs(chance["top1"] - 0.1) < 0.05, chance
    assert abs(chance["top5"] - 0.5) < 0.08, chance


def test_knn_ignores_unlabeled_rows() -> None:
    x, y = blobs(400, 1)
    tx, ty = blobs(100, 2)
    # unlabeled train rows sitting on every test point would win every vote if counted
    bad = torch.cat([x, tx])
    bad_y = torch.cat([y, torch.full((100,), -1)])
    ty_part = ty.clone()
    ty_part[:50] = -1
    assert knn_classify(bad, bad_y, tx, ty_part, C, k=5)["top1"] == pytest.approx(
        knn_classify(x, y, tx[50:], ty[50:], C, k=5)["top1"]
    )


def test_knn_and_topk_bad_input() -> None:
    x, y = blobs(10, 1)
    with pytest.raises(SeppError, match="16-d"):
        knn_classify(x, y, torch.randn(3, 16), torch.zeros(3, dtype=torch.long), C)
    with pytest.raises(SeppError, match="num_classes"):
        knn_classify(x, y, x, y, num_classes=3)
    with pytest.raises(SeppError, match="temperature"):
        knn_scores(x, y, x, C, temperature=0.0)
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    assert topk_accuracy(scores, torch.tensor([2, 0]), (1, 2)) == [0.5, 1.0]


def test_linear_probe_separable_and_random_labels() -> None:
    cfg = LinearProbeConfig(epochs=30, batch_size=256)
    x, y = blobs(1500, 1, spread=1.0)
    tx, ty = blobs(600, 2, spread=1.0)
    res = linear_probe(x, y, tx, ty, C, cfg)
    assert res["top1"] > 0.98, res
    assert set(res["val_top1"]) == {str(lr) for lr in cfg.lrs}
    assert res["best_lr"] in cfg.lrs
    assert res["val_top1"][str(res["best_lr"])] == max(res["val_top1"].values())
    rx, ry = noise(1500, 3)
    rtx, rty = noise(1000, 4)
    chance = linear_probe(rx, ry, rtx, rty, C, cfg)
    assert abs(chance["top1"] - 0.1) < 0.05, chance


def test_linear_probe_sgd_and_seeding() -> None:
    cfg = LinearProbeConfig(lrs=[0.01, 0.1], epochs=10, batch_size=128, optimizer="sgd")
    x, y = blobs(600, 1, spread=1.0)
    tx, ty = blobs(300, 2, spread=1.0)
    a = linear_probe(x, y, tx, ty, C, cfg, seed=1)
    b = linear_probe(x, y, tx, ty, C, cfg, seed=1)
    assert a == b
    assert a["top1"] > 0.9
    # features on another scale give the same result: the probe standardises them
    c = linear_probe(x * 1000 + 5, y, tx * 1000 + 5, ty, C, cfg, seed=1)
    assert abs(c["top1"] - a["top1"]) < 0.02


def test_linear_probe_bad_config() -> None:
    x, y = blobs(20, 1)
    with pytest.raises(SeppError, match="optimizer"):
        linear_probe(x, y, x, y, C, LinearProbeConfig(optimizer="lbfgs"))
    with pytest.raises(SeppError, match="lrs"):
        linear_probe(x, y, x, y, C, LinearProbeConfig(lrs=[]))


def _entry(name: str, knn: float, lin: float, semi: dict[str, float]) -> dict:
    e = {
        "name": name,
        "backbone": {"name": "resnet18"},
        "pretrain_dataset": None,
        "knn": {"top1": knn, "top5": 0.9},
        "linear": {"top1": lin, "top5": 0.95},
        "semisup": {f: {"top1": v} for f, v in semi.items()},
    }
    e["headline"] = headline(e)
    return e


def test_metrics_and_ablation_tables() -> None:
    base = _entry("all-augs", 0.80, 0.85, {"0.1": 0.6, "0.01": 0.4})
    no_blur = _entry("no-blur", 0.78, 0.86, {"0.1": 0.55, "0.01": 0.41})
    assert list(base["headline"]) == [
        "kNN top-1",
        "kNN top-5",
        "linear top-1",
        "linear top-5",
        "semi 1% top-1",
        "semi 10% top-1",
    ]
    md = metrics_table({"dataset": None, "checkpoints": [base, no_blur]})
    lines = md.strip().splitlines()
    assert lines[-2].startswith("| all-augs | resnet18 | ? | 80.00 | 90.00 | 85.00 |")
    assert lines[-1].startswith("| no-blur |")
    table = ablation_table({"all-augs": base, "no-blur": no_blur}, baseline="all-augs")
    row = table.strip().splitlines()[-1]
    assert "78.00 (-2.00)" in row and "86.00 (+1.00)" in row and "55.00 (-5.00)" in row
    # mean change over the six shared columns
    assert row.endswith(f"| {(-2 + 0 + 1 + 0 + 1 - 5) / 6:+.2f} |")
    flat = ablation_table({"a": {"acc": 0.5}, "b": {"acc": 0.25}}, "a")
    assert "25.00 (-25.00)" in flat
    with pytest.raises(SeppError, match="baseline 'x'"):
        ablation_table({"a": {"acc": 0.5}}, "x")
