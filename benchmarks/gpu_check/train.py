"""Parts that train through `sepp pretrain` (Ray Train, one worker): the figures the GPU runs
exist for, so they run first."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from benchmarks.gpu_check.common import PartContext, sizes, synthetic_dataset


def _steady(metrics: dict[str, Any]) -> float:
    """Mean pairs/s of the epochs after the first (the first warms up)."""
    h = metrics["history"]
    return float(np.mean([e["pairs_per_s"] for e in h[1:]] or [h[0]["pairs_per_s"]]))


def _pretrain(uri: str, root: str, **kw: Any) -> float:
    from sepp_ray.train.driver import PretrainConfig, pretrain

    cfg = PretrainConfig(
        dataset=uri, out=os.path.join(root, "run"), epochs=3, warmup_epochs=1,
        knn_monitor=False, checkpoint_every=3, shuffle_buffer=0, **kw,
    )  # fmt: skip
    return _steady(pretrain(cfg))


def ray_train(ctx: PartContext) -> None:
    """Steady-state pairs/s of SimCLR ResNet-18 at 32 px through Ray Train (DESIGN: 26,500 for
    the bare eager step on one H100; target 24,000)."""
    s = sizes(ctx.tiny)
    root = tempfile.mkdtemp(prefix="sepp-gpu-check-")
    uri = synthetic_dataset(s["n_images"], s["size"], root)
    v = _pretrain(uri, root, backbone=s["backbone"], cifar_stem=True, batch_size=s["batch"])
    ctx.add("sepp through Ray Train", round(v, 1), "pairs/s", ">= 24000", v >= 24000)


def train224(ctx: PartContext) -> None:
    """Steady-state pairs/s of SimCLR ResNet-50 at 224 px through Ray Train with decode_on=gpu
    (JPEG bytes decoded on the device; DESIGN: 2,000 pairs/s for the bare step on one H100,
    target 0.8x of it). Tiny: the same path on 16 px images and a test backbone."""
    if ctx.tiny:
        model, size, n, batch, stem = "test_resnet", 16, 128, 16, True
    else:
        model, size, n, batch, stem = "resnet50", 224, 6144, 256, False
    root = tempfile.mkdtemp(prefix="sepp-gpu-check-")
    uri = synthetic_dataset(n, size, root, jpeg=True)
    v = _pretrain(uri, root, backbone=model, cifar_stem=stem, batch_size=batch, decode_on="gpu")
    name = f"sepp through Ray Train, {model} {size} px, decode_on=gpu"
    ctx.add(name, round(v, 1), "pairs/s", ">= 1600", v >= 1600)
