"""The pretraining data plane: driver memory and object-store peak as N grows, and epoch
throughput of the streaming decode against a bare decode loop on the same images.

Memory: for each N, synthetic tiny images are written as image shards (ingest's schema and row
groups), with pairs for 5% of them (2 positives each), and a fresh driver process plans a
dataset-mode run as `sepp pretrain` does: item plan from ids, the item table (a Ray Data job),
the row-group census (Ray tasks) and every rank's rows of one epoch (8 ranks). It reports the
driver's peak RSS above its baseline and the object store's peak use; beside it, what the old
driver did (the whole split read into one Arrow table) for the same N.

Throughput: real CIFAR-10 JPEGs at 32 px (full decode, the GPU crops) and the same images
re-encoded at 256 px shorter side (JPEG q90; random resized crop to 224 on the CPU), one epoch
through `DataPlan.batches` (parallel Ray tasks) versus a single-process loop doing the same
decode (and crop) per image, side by side. Ray Data's standard training ingest against the
feed, both warm, is `benchmarks/ingest_compare.py`.

    python benchmarks/dataplane.py --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/dataplane.py --n 50000 200000 1000000 --images 20000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sepp_ray.data.schema import IMAGE_SCHEMA  # noqa: E402

PER_FILE = 10_000


def write_dataset(
    root: Path, blobs: list[bytes], labels: list[int], size: tuple[int, int], per_file: int
) -> None:
    """Image shards and a manifest as ingest writes them (ids 1..N, split train)."""
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    files = []
    for f, start in enumerate(range(0, len(blobs), per_file)):
        stop = min(start + per_file, len(blobs))
        ids = list(range(start + 1, stop + 1))
        t = pa.table(
            {
                "id": ids,
                "image": blobs[start:stop],
                "label": labels[start:stop],
                "split": ["train"] * (stop - start),
                "key": [str(i) for i in ids],
            },
            schema=IMAGE_SCHEMA,
        )
        pq.write_table(t, shards / f"part-{f:05d}.parquet", row_group_size=256)
        files.append({"path": f"shards/part-{f:05d}.parquet", "rows": stop - start})
    n = len(blobs)
    manifest = {
        "kind": "images",
        "num_images": n,
        "classes": [str(c) for c in range(10)],
        "splits": {"train": {"total": n, "labeled": n, "per_class": {}}},
        "image_size": {"width": [size[0]] * 2, "height": [size[1]] * 2, "uniform": True},
        "files": files,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


def synthetic(n: int) -> tuple[list[bytes], list[int]]:
    """n distinct tiny PNGs (4 x 4), cheaply: 256 base images with the id in a pixel."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (256, 4, 4, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        a = base[i % 256].copy()
        a[0, 0] = (i & 255, (i >> 8) & 255, (i >> 16) & 255)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG", compress_level=1)
        out.append(buf.getvalue())
    return out, [i % 10 for i in range(n)]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_memory(root: str, mode: str) -> None:
    """One fresh driver: plan a run (``mode`` "new") or read the split ("old"); print JSON."""
    import ray

    from sepp_ray.data.dataset import ImageDataset
    from sepp_ray.train.dataplane import item_table, training_chunks
    from sepp_ray.train.items import PairsConfig, plan_items
    from sepp_ray.train.plan import rank_slices, total_rows

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ImageDataset.open(root)
    base = _rss_mb()  # after imports and ray.init: what grows from here is the data's
    peak = {"rss": base, "store": 0.0}
    total = ray.cluster_resources().get("object_store_memory", 0)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], _rss_mb())
            free = ray.available_resources().get("object_store_memory", total)
            peak["store"] = max(peak["store"], (total - free) / 2**20)
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t0 = time.perf_counter()
    if mode == "old":
        table = ds.read_table(["id", "image"], split="train")
        rows = table.num_rows
    else:
        pairs = pq.read_table(Path(root) / "pairs.parquet")
        plan = plan_items(pairs, None, PairsConfig(pairs="x", mode="dataset"))
        out = tempfile.mkdtemp(prefix="sepp-bench-run-")
        files = item_table(plan, ds, "train", out, seed=0)
        chunks = training_chunks(ds, plan, files, "train", None)
        rows = total_rows(chunks)
        per_rank = (rows // 1024) * 128
        for r in range(8):
            rank_slices(chunks, 0, 0, 8, r, per_rank)
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    print(
        json.dumps(
            {
                "rows": rows,
                "driver_mb": round(peak["rss"] - base, 1),
                "store_mb": round(peak["store"], 1),
                "seconds": round(seconds, 1),
            }
        )
    )
    ray.shutdown()


def memory(ns: list[int], work: Path) -> list[dict[str, object]]:
    rows = []
    for n in ns:
        root = work / f"syn-{n}"
        blobs, labels = synthetic(n)
        write_dataset(root, blobs, labels, (4, 4), PER_FILE)
        rng = np.random.default_rng(1)
        anchors = rng.choice(np.arange(1, n + 1), n // 20, replace=False)
        a = np.repeat(anchors, 2)
        p = (a + rng.integers(1, n, len(a))) % n + 1
        pq.write_table(pa.table({"anchor_id": a, "positive_id": p}), root / "pairs.parquet")
        res = {"n": n, "pairs": len(a), "image_mb": round(sum(map(len, blobs)) / 2**20, 1)}
        for mode in ("new", "old"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(root), mode],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "RAY_AUTH_MODE": "disabled"},
            )
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(res), flush=True)
        rows.append(res)
    return rows


def cifar_blobs(tar: str, limit: int) -> list[tuple[bytes, int]]:
    out = []
    with tarfile.open(tar) as tf:
        for m in tf:
            if m.isfile() and "/train/" in f"/{m.name}" and m.name.endswith(".jpg"):
                cls = m.name.split("/")[-2]
                out.append((tf.extractfile(m).read(), hash(cls) % 10))  # type: ignore[union-attr]
                if len(out) >= limit:
                    break
    return out


def upscale(blob: bytes) -> bytes:
    img = Image.open(io.BytesIO(blob)).convert("RGB").resize((341, 256), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def throughput(tar: str, n: int, work: Path) -> list[dict[str, object]]:
    import ray

    from sepp_ray.data.dataset import ImageDataset
    from sepp_ray.train.census import census
    from sepp_ray.train.dataplane import DataPlan, image_files
    from sepp_ray.train.decode import CropSpec, DecodeSpec, random_resized_crop
    from sepp_ray.train.feed import FeedConfig
    from sepp_ray.train.plan import total_rows

    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources()["CPU"])
    items = cifar_blobs(tar, n)
    rows = []
    for name, blobs, spec, side in (
        ("32 px JPEG, full", [b for b, _ in items], DecodeSpec("full", 32, split="train"), 32),
        (
            "256 px JPEG, RRC 224 on CPU",
            [upscale(b) for b, _ in items[: max(1, n // 5)]],
            DecodeSpec("crop", 224, view1=CropSpec(224), view2=CropSpec(224), split="train"),
            256,
        ),
    ):
        root = work / f"tp-{side}"
        write_dataset(root, blobs, [lab for _, lab in items[: len(blobs)]], (side, side), 1000)
        ds = ImageDataset.open(str(root))
        chunks = census(image_files(ds), "images", "train", None)
        batch = 256
        data = DataPlan(
            chunks,
            spec,
            FeedConfig(local_batch=batch),  # read_ahead: the node's spare CPUs
            batch,
            total_rows(chunks) // batch,
            2 * (total_rows(chunks) // batch),  # two epochs: one to warm up, one timed
            0,
        )
        list(data.batches(0, 1, 0))  # warm the workers
        t0 = time.perf_counter()
        seen = sum(len(b["id"]) for b in data.batches(1, 1, 0))
        stream = seen / (time.perf_counter() - t0)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for b in blobs:
            img = Image.open(io.BytesIO(b)).convert("RGB")
            if spec.mode == "crop":
                assert spec.view1 is not None
                random_resized_crop(img, spec.view1, rng)
                random_resized_crop(img, spec.view1, rng)
            else:
                np.asarray(img)
        bare = len(blobs) / (time.perf_counter() - t0)
        res = {
            "images": name,
            "n": len(blobs),
            "cpus": cpus,
            "stream_per_s": round(stream),
            "bare_1proc_per_s": round(bare),
            "stream_per_core": round(stream / cpus),
            "ratio_per_core": round(stream / cpus / bare, 2),
        }
        print(json.dumps(res), flush=True)
        rows.append(res)
    ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="*", default=[50_000, 200_000, 1_000_000])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--images", type=int, default=20_000, help="real images for throughput")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.child:
        child_memory(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="sepp-bench-") as tmp:
        result = {
            "memory": memory(args.n, Path(tmp)) if args.n else [],
            "throughput": throughput(args.data, args.images, Path(tmp)) if args.images else [],
        }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
