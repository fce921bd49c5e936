"""Throughput of the batched augmentation (views/s), on CPU and on CUDA when there is one.

DESIGN.md's reason for batched device augmentation: CPU torchvision reaches ~7,100 SimCLR pairs/s
with 16 workers. Run: `python benchmarks/augment.py [--recipe simclr] [--sizes 32 96]`.
Inputs are random uint8 images of the view size (CIFAR at 32 px, STL-10 at 96 px).
"""

from __future__ import annotations

import argparse
import time

import torch

from sepp_ray.data.augment import GPUAugment
from sepp_ray.data.recipes import RECIPES, get_recipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def views_per_second(
    recipe_name: str,
    size: int,
    batch: int,
    device: torch.device,
    seconds: float,
    dtype: torch.dtype,
    source_size: int | None = None,
) -> float:
    """Views made per second by `GPUAugment(recipe)` on uint8 batches already on `device`."""
    recipe = get_recipe(recipe_name, size)
    aug = GPUAugment(recipe, seed=0, dtype=dtype, channels_last=True)
    src = source_size or size
    x = torch.randint(0, 256, (batch, 3, src, src), dtype=torch.uint8, device=device)
    for _ in range(3):  # warm-up: kernels, allocator, cached constants
        aug(x)
    _sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(aug(x))
        if device.type == "cuda" and n % 64 == 0:
            _sync(device)  # keep the launch queue from running far ahead of the clock
    _sync(device)
    return n * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="simclr", choices=sorted(RECIPES))
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    ap.add_argument("--source-size", type=int, default=None, help="source side (default: view)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per case")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if any")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, cpu threads {torch.get_num_threads()}")
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for size in args.sizes:
            vps = views_per_second(
                args.recipe, size, args.batch, device, args.seconds, dtype, args.source_size
            )
            print(
                f"{label:>24} | {args.recipe} {size:>3} px from {args.source_size or size} px"
                f" | batch {args.batch} | {args.dtype} | {vps:12,.0f} views/s"
            )


if __name__ == "__main__":
    main()
