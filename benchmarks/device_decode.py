"""Images/s of decoding JPEGs and taking two 224 px random resized crops per image: the device
path (`sepp_ray.train.device_decode`, ``decode_on=gpu``) against the CPU read tasks' "crop"
decode (`decode_rows`), side by side on one core, in alternating rounds.

Inputs are ImageNet-like JPEGs, shorter side 256 and the longer side 256-384 px: CIFAR-10 JPEGs
from ``../shared/data`` upscaled (bicubic) and re-encoded at quality 90, or smooth synthetic
images when that file is absent. On a CUDA machine, ``--devices cpu cuda`` adds the nvJPEG path.

Run: `python -m benchmarks.device_decode [--images 256] [--batch 64] [--rounds 5]`.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from sepp_ray.train.decode import CropSpec, DecodeSpec, decode_on_device, decode_rows
from sepp_ray.train.device_decode import crop_generator, decode_images

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _sources(n: int, seed: int) -> list[Image.Image]:
    """``n`` small images: CIFAR-10 JPEGs when available, else smooth random ones."""
    if CIFAR.exists():
        out: list[Image.Image] = []
        with tarfile.open(CIFAR) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    f = tar.extractfile(member)
                    assert f is not None
                    out.append(Image.open(io.BytesIO(f.read())).convert("RGB"))
                    if len(out) == n:
                        return out
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return [Image.fromarray(a).resize((32, 32), Image.Resampling.BICUBIC) for a in small]


def imagenet_like(n: int, short: int = 256, seed: int = 0) -> list[bytes]:
    """JPEGs of shorter side ``short``, aspect ratios 1 to 1.5, half of them portrait."""
    rng = np.random.default_rng(seed)
    out = []
    for i, img in enumerate(_sources(n, seed)):
        long = int(short * rng.uniform(1.0, 1.5))
        size = (long, short) if i % 2 else (short, long)
        buf = io.BytesIO()
        img.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _tables(blobs: list[bytes], batch: int) -> list[pa.Table]:
    ids = np.arange(len(blobs), dtype=np.int64)
    table = pa.table({"id": ids, "image": pa.array(blobs, pa.binary()), "label": ids % 10})
    return [table.slice(a, batch) for a in range(0, len(blobs) - batch + 1, batch)]


def _timed(fn: Callable[[], object], sync: Callable[[], None], clock: Callable[[], float]) -> float:
    sync()
    start = clock()
    fn()
    sync()
    return clock() - start


def measure(
    blobs: list[bytes], batch: int, size: int, rounds: int, devices: list[str], cpu_clock: bool
) -> dict:
    """Median images/s of each path over ``rounds`` alternating rounds (each over all images).
    ``cpu_clock``: time by this process's CPU time (one thread: per core, and steady on a
    shared machine); CUDA paths are always timed by the wall clock."""
    views = CropSpec(size)
    cpu_spec = DecodeSpec("crop", size, view1=views, view2=views)
    dev_spec = DecodeSpec("bytes", size, view1=views, view2=views)
    tables = _tables(blobs, batch)
    raw = [decode_rows(t, DecodeSpec("bytes", size), np.random.default_rng(0)) for t in tables]
    n = sum(t.num_rows for t in tables)
    rng = np.random.default_rng(0)

    def cpu_crop() -> None:
        for t in tables:
            decode_rows(t, cpu_spec, rng)

    paths: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        "cpu crop (decode_rows, PIL)": (cpu_crop, lambda: None)
    }
    for dev in devices:
        device = torch.device(dev)
        gen = crop_generator(device, 0)

        def sync(device: torch.device = device) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def device_path(device: torch.device = device, gen: torch.Generator = gen) -> None:
            for b in raw:
                decode_on_device(b, device, dev_spec, gen)

        def decode_only(device: torch.device = device) -> None:
            for b in raw:
                decode_images(list(b["image_bytes"]), device)

        paths[f"device path on {dev} (decode + crop)"] = (device_path, sync)
        paths[f"device path on {dev}, decode only"] = (decode_only, sync)
    for fn, _ in paths.values():  # warm-up: allocator, decoder handles, kernels
        fn()
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, (fn, wait) in paths.items():
            wall = "cuda" in name or not cpu_clock
            clock = time.perf_counter if wall else time.process_time
            rates[name].append(n / _timed(fn, wait, clock))
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--short", type=int, default=256, help="stored shorter side")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: per core)")
    p.add_argument("--devices", nargs="+", default=["cpu"])
    p.add_argument("--wall", action="store_true", help="wall clock for CPU paths too")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    blobs = imagenet_like(a.images, a.short)
    rates = measure(blobs, a.batch, a.size, a.rounds, a.devices, cpu_clock=not a.wall)
    base = rates["cpu crop (decode_rows, PIL)"]
    print(
        f"{len(blobs)} JPEGs, shorter side {a.short}, two {a.size} px crops each, batch "
        f"{a.batch}, torch threads {a.threads}, median of {a.rounds} alternating rounds, "
        f"CPU paths timed by {'wall clock' if a.wall else 'process CPU time'}"
    )
    print("| path | images/s | vs cpu crop |\n|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {r:,.0f} | {r / base:.2f}x |")


if __name__ == "__main__":
    main()
