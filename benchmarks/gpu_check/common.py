"""What every part of the GPU check shares: its context (mode, output folder, the figures it
writes as it measures them), sizes, and the small builders several parts use.

A part is a function ``part(ctx: PartContext) -> None`` that calls ``ctx.add`` for each figure as
soon as it is measured: the figures are on disk at once, so a part cut by its time limit still
reports what it measured before the cut.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
Figure = dict[str, Any]


def fig(name: str, value: Any, unit: str = "", target: str = "", ok: bool | None = None) -> Figure:
    """One figure of a part: `ok` None when it has no target (context for others)."""
    return {"name": name, "value": value, "unit": unit, "target": target, "ok": ok}


def part_file(out: Path, name: str) -> Path:
    return out / "parts" / f"{name}.json"


@dataclass
class PartContext:
    """One part's run: ``tiny`` (CPU-sized inputs), ``out`` (the check's folder), and the
    figures so far, rewritten to ``out/parts/<name>.json`` on every `add`."""

    name: str
    tiny: bool
    out: Path
    figures: list[Figure] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def add(
        self, name: str, value: Any, unit: str = "", target: str = "", ok: bool | None = None
    ) -> None:
        self.figures.append(fig(name, value, unit, target, ok))
        self.write("running")

    def write(self, status: str) -> None:
        rec = {
            "status": status,
            "seconds": round(time.perf_counter() - self.started, 1),
            "figures": self.figures,
        }
        path = part_file(self.out, self.name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, path)  # a reader never sees half a file, even when the part is killed


PartFn = Callable[[PartContext], None]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sizes(tiny: bool) -> dict[str, Any]:
    """The training parts' sizes: full is what the targets are stated for (DESIGN.md ceilings)."""
    if tiny:
        return dict(backbone="test_resnet", size=16, batch=16, steps=4, n_images=128, workers=1)
    workers = min(16, os.cpu_count() or 1)
    return dict(backbone="resnet18", size=32, batch=512, steps=30, n_images=16384, workers=workers)


def rate(
    step: Callable[[], None], steps: int, items: int, device: torch.device, warm: int = 3
) -> float:
    """items/s of ``step`` over ``steps`` calls after ``warm`` untimed ones."""
    for _ in range(warm):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * items / (time.perf_counter() - t0)


def sepp_trainer(
    backbone: str, size: int, device: torch.device, compile_backend: str = "", ddp: bool = False
) -> Any:
    """sepp's SimCLR `Trainer` as a Ray Train worker builds it (DDP around the loss module when
    a process group is up and ``ddp``), on views already on ``device``."""
    from sepp_ray.data.augment import GPUAugment
    from sepp_ray.data.recipes import get_recipe
    from sepp_ray.methods import create_method
    from sepp_ray.train.optim import build_optimizer
    from sepp_ray.train.step import StepConfig, Trainer, prepare_loss_module

    torch.manual_seed(0)
    cuda = device.type == "cuda"
    method = create_method("simclr", backbone=backbone, cifar_stem=True)
    module = prepare_loss_module(method, device, channels_last=cuda)
    model: torch.nn.Module = module
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if cuda else None
        model = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    if compile_backend:
        model = torch.compile(model, backend=compile_backend)  # type: ignore[assignment]
    augment = GPUAugment(get_recipe("simclr", size), seed=0, channels_last=cuda)
    opt = build_optimizer("lars", method, 0.3, 1e-6)
    method.train()
    cfg = StepConfig(channels_last=cuda)
    return Trainer(model, method, augment, opt, cfg, 10_000, 10, base_lr=0.3)


def device_batch(n: int, size: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A uint8 NHWC batch on the device, as the feed hands it to the step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g).to(device)
    ids = torch.arange(n, device=device) + seed * n
    return {"image": x, "image2": x, "id": ids, "view_ids": torch.stack([ids, ids], 1)}


def synthetic_dataset(
    n: int, size: int, root: str, jpeg: bool = False, chunk: int | None = None
) -> str:
    """An ingested synthetic dataset of ``n`` images stored at ``size`` px (JPEG when ``jpeg``,
    as ``decode_on=gpu`` needs), in shards of ``chunk`` images (default: 16 at full size)."""
    from sepp_ray.data.ingest import ImageOptions, ingest
    from sepp_ray.data.sources import SourceOptions, open_source

    uri = os.path.join(root, f"synthetic-{n}-{size}{'-jpeg' if jpeg else ''}")
    chunk = chunk or min(4096, max(256, n // 16))
    opts = SourceOptions(n=n, size=size, chunk_size=chunk)
    images = ImageOptions(encoding="jpeg") if jpeg else None
    ingest(open_source("synthetic", options=opts), uri, images)
    return uri
