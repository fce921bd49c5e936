"""The classic baseline: torchvision's SimCLR augmentation per image in DataLoader workers on the
CPU, feeding the training step.

Measured in steady state only. A DataLoader's workers start preparing batches the moment it is
iterated (``prefetch_factor`` each), so the first ``workers x prefetch_factor`` batches were
made while nothing was timed: timing them measures the step, not the loader. Those are drained
first, then at least 20 batches are timed, drawn from one endless sampler (no epoch ends, which
would restart the workers' queues inside the timed window).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MIN_TIMED = 20  # batches timed after the drain, at the least


class TorchvisionPairs(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Two torchvision views of an image (SimCLR's recipe: crop, flip, jitter, grayscale)."""

    def __init__(self, images: np.ndarray) -> None:
        from torchvision.transforms import v2

        self.images = images
        s = images.shape[1]
        self.t = v2.Compose(
            [
                v2.RandomResizedCrop(s, scale=(0.08, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        img = torch.from_numpy(self.images[i]).permute(2, 0, 1)
        return self.t(img), self.t(img), i


@dataclass(frozen=True)
class LoaderPlan:
    """How many batches the loader serves: ``drain`` untimed, then ``timed``."""

    workers: int
    prefetch_factor: int = 2
    timed: int = MIN_TIMED

    @property
    def drain(self) -> int:
        """Every batch the workers could have prepared before timing starts, and two more."""
        return max(1, self.workers) * self.prefetch_factor + 2

    @property
    def total(self) -> int:
        return self.drain + max(self.timed, MIN_TIMED)


def make_loader(images: np.ndarray, batch: int, plan: LoaderPlan, device: torch.device) -> Any:
    """A DataLoader over an endless seeded sampler: exactly ``plan.total`` batches, no epoch end."""
    ds = TorchvisionPairs(images)
    sampler = torch.utils.data.RandomSampler(
        ds,
        replacement=True,
        num_samples=plan.total * batch,
        generator=torch.Generator().manual_seed(0),
    )
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        drop_last=True,
        num_workers=plan.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=plan.prefetch_factor if plan.workers > 0 else None,
    )


def steady_rate(
    batches: Iterator[Any], plan: LoaderPlan, batch: int, consume: Callable[[Any], None],
    device: torch.device,
) -> tuple[float, int]:  # fmt: skip
    """(items/s, batches timed): ``consume`` every batch; the clock starts after the drain."""
    from benchmarks.gpu_check.common import sync

    n, t0 = 0, 0.0
    for i, b in enumerate(batches):
        if i == plan.drain:
            sync(device)
            t0 = time.perf_counter()
        consume(b)
        if i >= plan.drain:
            n += 1
    sync(device)
    if n < MIN_TIMED:
        raise RuntimeError(f"the loader served {n} timed batches, fewer than {MIN_TIMED}")
    return n * batch / (time.perf_counter() - t0), n


def step_consumer(trainer: Any, device: torch.device) -> Callable[[Any], None]:
    """One training step on a loader batch (views already augmented: only the model and loss)."""

    def consume(b: Any) -> None:
        v1, v2, ids = (t.to(device, non_blocking=True) for t in b)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = trainer.loss_module([v1, v2], ids, None, 0)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return consume
