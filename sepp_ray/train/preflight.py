"""Pre-flight memory check: one forward/backward at the local batch before a run commits.

A local batch too big for the GPU (ResNet-50 at 224 px on a 40 GB A100, say) would otherwise
fail at the first step, after minutes of start-up, or, under ``FailureConfig``, be retried
several times over. Every rank builds its model, then, before the first epoch, runs one training
forward/backward on random images of the run's shape (the same Trainer: views, autocast,
channels_last, DDP, the loss's cross-rank gathers). A step that runs out of memory, or whose
peak exceeds ``limit_bytes``, is tried again at half the batch until one fits; the error then
names the global batch that fits. Rank 0 leaves the error in OUT (like a divergence, a raise
would make Ray Train retry the same failure) and the driver raises it. Weights, buffers (BN
statistics, MoCo's queue, DINO's centre), gradients and random state are restored afterwards,
so a run with the check trains exactly as one without it.

Peak memory: on CUDA the caching allocator's peak (``torch.cuda.max_memory_allocated``); on a
CPU, where no allocator keeps one, the tensors saved for backward plus weights and gradients
(``torch.autograd.graph.saved_tensors_hooks``), which is what a ``limit_bytes`` test measures.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sepp_ray import dist
from sepp_ray.errors import SeppError
from sepp_ray.train.rng import rng_state, set_rng_state

if TYPE_CHECKING:
    from sepp_ray.storage import Location
    from sepp_ray.train.step import Trainer

PREFLIGHT_FAILED = "_PREFLIGHT_FAILED.json"
GiB = 1024**3
MIN_BATCH = 2  # contrastive losses need a negative


@dataclass(frozen=True)
class Attempt:
    batch: int
    fits: bool
    peak_bytes: int  # 0 when it ran out of memory


def _batch(trainer: Trainer, n: int, size: int) -> dict[str, Any]:
    rng = np.random.default_rng(n)
    img = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ids = np.arange(n)
    batch: dict[str, Any] = {
        "image": img,
        "image2": img.copy(),
        "id": ids,
        "view_ids": np.stack([ids, ids], 1),
    }
    if trainer.method.needs_labels:
        batch["label"] = np.arange(n) % 2
    if trainer.cfg.pair_use != "none":
        batch["pos_ids"] = np.full((n, 1), -1, dtype=np.int64)
        batch["group"] = np.full(n, -1, dtype=np.int64)
    return batch


def _saved_bytes_hooks(seen: dict[int, int]) -> Any:
    """Hooks that record the storage of every tensor autograd saves for backward."""

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def step_peak(trainer: Trainer, n: int, size: int) -> int:
    """Peak bytes of one forward/backward at local batch ``n`` (see the module docstring);
    raises torch.OutOfMemoryError when CUDA runs out."""
    device = trainer.device
    batch = _batch(trainer, n, size)
    params = [p for p in trainer.method.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    seen: dict[int, int] = {p.untyped_storage().data_ptr(): 0 for p in params}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with _saved_bytes_hooks(seen):
        views, ids, extra = trainer.views(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=trainer.amp):
            # the module DDP wraps: an out-of-memory inside DDP's backward would leave its
            # reducer mid-iteration; the loss's own gathers still run on every rank
            loss = trainer.loss_module(views, ids, epoch=0, **extra)
        loss.backward()
    if cuda:
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return int(sum(seen.values()) + 2 * weights)  # saved activations, weights, gradients


def _try(trainer: Trainer, n: int, size: int, limit: int | None) -> Attempt:
    """One attempt; every rank agrees on the outcome (the next attempt has collectives)."""
    try:
        peak = step_peak(trainer, n, size)
        ok = limit is None or peak <= limit
    except Exception as e:
        if not _is_oom(e):
            raise
        peak, ok = 0, False
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        for p in trainer.method.parameters():
            p.grad = None
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()
    bad = dist.all_reduce_sum(torch.tensor([0.0 if ok else 1.0], device=trainer.device))
    return Attempt(n, bool(bad.item() == 0), peak)


def find_fit(
    trainer: Trainer, local_batch: int, size: int, limit_bytes: int | None = None
) -> list[Attempt]:
    """Attempts at ``local_batch``, then halving while none fits (down to MIN_BATCH). The
    model's state and all random state are as before afterwards."""
    state = copy.deepcopy(trainer.method.state_dict())
    rng = rng_state(trainer.augment, trainer.device)
    was_training = trainer.method.training
    trainer.method.train()
    attempts: list[Attempt] = []
    try:
        n = local_batch
        while True:
            attempts.append(_try(trainer, n, size, limit_bytes))
            if attempts[-1].fits or n <= MIN_BATCH:
                break
            n = max(MIN_BATCH, n // 2)
    finally:
        trainer.method.load_state_dict(state)
        set_rng_state(rng, trainer.augment, trainer.device)
        trainer.method.train(was_training)
    return attempts


def preflight_error(
    attempts: list[Attempt],
    *,
    workers: int,
    backbone: str,
    image_size: int,
    device: torch.device,
    limit_bytes: int | None,
) -> str | None:
    """The error for a first attempt that did not fit, naming a global batch that does."""
    first = attempts[0]
    if first.fits:
        return None
    where = _memory_of(device, limit_bytes)
    head = (
        f"local batch {first.batch} (batch_size {first.batch * workers} over {workers} "
        f"workers) of {backbone} at {image_size} px does not fit in {where}"
    )
    fit = next((a for a in attempts if a.fits), None)
    if fit is None:
        return (
            f"{head}, nor does local batch {attempts[-1].batch}: use a smaller backbone or "
            "image_size, or a device with more memory"
        )
    return (
        f"{head}: local batch {fit.batch} fits (peak {fit.peak_bytes / GiB:.1f} GiB), so "
        f"batch_size={fit.batch * workers} with workers={workers}; or keep batch_size and "
        f"use workers={workers * -(-first.batch // fit.batch)}"
    )


def _memory_of(device: torch.device, limit_bytes: int | None) -> str:
    if limit_bytes is not None:
        return f"the {limit_bytes / GiB:.2g} GiB limit"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"the {props.total_memory / GiB:.1f} GiB of a {props.name}"
    return "memory"


def run_preflight(
    trainer: Trainer,
    rank: int,
    *,
    out: str,
    local_batch: int,
    image_size: int,
    workers: int,
    backbone: str,
    limit_gb: float | None = None,
    enabled: bool = True,
) -> bool:
    """The worker's check. True when ``local_batch`` does not fit: every rank then stops, and
    rank 0 has left the error for the driver in ``out``. ``limit_gb``: the peak allowed, in GiB
    (None: what the device has); ``enabled=False`` (``preflight=false``) skips the check."""
    from sepp_ray.storage import Location

    if not enabled:
        return False
    limit = None if limit_gb is None else int(limit_gb * GiB)
    attempts = find_fit(trainer, local_batch, image_size, limit)
    error = preflight_error(
        attempts,
        workers=workers,
        backbone=backbone,
        image_size=image_size,
        device=trainer.device,
        limit_bytes=limit,
    )
    if error is None:
        return False
    if rank == 0:
        Location(out).write_bytes(PREFLIGHT_FAILED, json.dumps({"error": error}).encode())
    return True


def check_preflight(loc: Location) -> None:
    """Driver side: raise the error a failed pre-flight check left in ``loc`` (and remove it,
    so a rerun with a smaller batch starts clean)."""
    if not loc.exists(PREFLIGHT_FAILED):
        return
    error = json.loads(loc.read_bytes(PREFLIGHT_FAILED))["error"]
    loc.fs.rm(loc.join(PREFLIGHT_FAILED))
    raise SeppError(f"pre-flight memory check: {error} (preflight=false skips the check)")
