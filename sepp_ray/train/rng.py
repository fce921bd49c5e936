"""Seeds and random-generator state of a training rank: what a resumed run restores to draw
exactly what the uninterrupted run would have (checkpoints hold it; the pre-flight check puts
it back after its trial steps)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from sepp_ray.data.augment import GPUAugment


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and CUDA) with a seed derived from (seed, rank), so
    ranks draw different streams and (seed, rank) pairs never collide. Returns that seed; give
    it to `GPUAugment(seed=...)` too."""
    derived = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)  # also seeds every CUDA device
    return derived


def rng_state(augment: GPUAugment | None = None, device: Any = None) -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states, and the augment's generator on
    `device`: what a resumed run needs to draw exactly what the uninterrupted run would have.

    Plain containers and tensors only, so `torch.load(..., weights_only=True)` reads it back.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if augment is not None and device is not None:
        state["augment"] = augment.generator(torch.device(device)).get_state()
    return state


def set_rng_state(
    state: dict[str, Any], augment: GPUAugment | None = None, device: Any = None
) -> None:
    """Restore what `rng_state` returned (CUDA states only when the device count matches)."""
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if augment is not None and device is not None and "augment" in state:
        augment.generator(torch.device(device)).set_state(state["augment"])


def _tuples(x: Any) -> Any:
    """random.setstate wants nested tuples; a checkpoint round trip may give lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
