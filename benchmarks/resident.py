"""The resident data plane against the streaming one and a bare decode loop, one run.

Real CIFAR-10 JPEGs (32 px) from ``../shared/data`` written as image shards; per epoch, images
per second a rank is served:

1. resident: the split decoded once into memory (`ResidentFeed`: Ray tasks decode the row
   groups, the rank copies them into one uint8 tensor on its device), then each step gathers
   its rows (views 1 and 2) on the device; the one-time load is reported apart;
2. streaming: `DataPlan.batches` (Ray tasks read and decode row groups every epoch, shuffle
   buffer, prefetch thread), one rank;
3. bare: a single-process loop decoding the same JPEGs (PIL, to numpy), no Ray.

Every figure is taken after a warm-up epoch, and the paths alternate over ``--rounds`` so each
sees the same machine load; the medians are reported.

    python -m benchmarks.resident --images 10000 --rounds 3 [--device cuda]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.dataplane import cifar_blobs, write_dataset
from sepp_ray.data.dataset import ImageDataset
from sepp_ray.train.census import census
from sepp_ray.train.dataplane import DataPlan, image_files
from sepp_ray.train.decode import DecodeSpec
from sepp_ray.train.feed import FeedConfig
from sepp_ray.train.items import PairsConfig, plan_items
from sepp_ray.train.plan import total_rows
from sepp_ray.train.resident import ResidentFeed, ResidentItems, ResidentPlan, decode_split

ROOT = Path(__file__).resolve().parents[1]


def resident_plan(ds: ImageDataset, batch: int, cpus: float) -> ResidentPlan:
    chunks = census(image_files(ds), "images", "train", None)
    n = total_rows(chunks)
    items = ResidentItems.of(plan_items(None, None, PairsConfig(mode="none"), 0), 1)
    return ResidentPlan(
        refs=decode_split(chunks, "train", (32, 32), cpus)[1],
        shape=(32, 32),
        images=n,
        items=items,
        global_batch=batch,
        steps_per_epoch=n // batch,
        total_steps=10_000 * (n // batch),
        seed=0,
    )


def stream_plan(ds: ImageDataset, batch: int, read_ahead: int) -> DataPlan:
    chunks = census(image_files(ds), "images", "train", None)
    steps = total_rows(chunks) // batch
    return DataPlan(
        chunks,
        DecodeSpec("full", 32, split="train"),
        FeedConfig(local_batch=batch, read_ahead=read_ahead),
        batch,
        steps,
        10_000 * steps,
        0,
    )


def rate(batches: object, sync: bool) -> float:
    """Images per second of one epoch's batches (the device drained at the end)."""
    import torch

    t0 = time.perf_counter()
    seen = 0
    for b in batches:  # type: ignore[attr-defined]
        seen += len(b["id"])
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def bare(blobs: list[bytes]) -> float:
    t0 = time.perf_counter()
    for b in blobs:
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    return len(blobs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources()["CPU"])
    items = cifar_blobs(args.data, args.images)
    blobs = [b for b, _ in items]
    root = Path(tempfile.mkdtemp(prefix="sepp-bench-res-")) / "ds"
    write_dataset(root, blobs, [lab for _, lab in items], (32, 32), 1000)
    ds = ImageDataset.open(str(root))
    t0 = time.perf_counter()
    feed = ResidentFeed(resident_plan(ds, args.batch, 1.0), args.device)
    load_s = time.perf_counter() - t0
    stream = stream_plan(ds, args.batch, 2 * cpus)
    rate(feed.batches(0, 1, 0), True)  # warm-up epochs
    rate(stream.batches(0, 1, 0), False)
    got: dict[str, list[float]] = {"resident": [], "stream": [], "bare": []}
    for r in range(1, args.rounds + 1):
        got["resident"].append(rate(feed.batches(r, 1, 0), True))
        got["stream"].append(rate(stream.batches(r, 1, 0), False))
        got["bare"].append(bare(blobs))
    med = {k: float(np.median(v)) for k, v in got.items()}
    res = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "device": args.device,
        "images": len(blobs),
        "batch": args.batch,
        "resident_load_s": round(load_s, 2),
        "resident_per_s": round(med["resident"]),
        "stream_per_s": round(med["stream"]),
        "stream_per_core": round(med["stream"] / cpus),
        "bare_1proc_per_s": round(med["bare"]),
        "resident_vs_stream": round(med["resident"] / med["stream"], 1),
        "resident_vs_bare_core": round(med["resident"] / med["bare"], 1),
        "rounds": got,
    }
    print(json.dumps(res), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
