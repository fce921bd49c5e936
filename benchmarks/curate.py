"""Is the `sepp curate` page responsive on a large mining result? Time to first page, time per
page (the JSON of a page and every image on it, as the browser asks for them) and the server's
memory, on generated pairs over generated PNG images (32x32, 4 classes).

    python benchmarks/curate.py --images 20000 --pairs 100000 --pages 20
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sepp_ray.data.schema import IMAGE_SCHEMA
from sepp_ray.storage import begin_write, finish_write

REPO = Path(__file__).resolve().parents[1]


def make(root: Path, n_images: int, n_pairs: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**62, size=n_images, replace=False).astype(np.int64)
    labels = (np.arange(n_images) % 4).astype(np.int32)
    ds = begin_write(str(root / "images"))
    files = []
    per = 10_000
    for s in range(0, n_images, per):
        blobs = []
        for i in range(s, min(s + per, n_images)):
            px = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            px[..., labels[i] % 3] = 200
            buf = io.BytesIO()
            Image.fromarray(px).save(buf, "PNG")
            blobs.append(buf.getvalue())
        n = len(blobs)
        t = pa.table(
            {
                "id": ids[s : s + n],
                "image": blobs,
                "label": labels[s : s + n],
                "split": ["train"] * n,
                "key": [f"{i}.png" for i in range(s, s + n)],
            },
            schema=IMAGE_SCHEMA,
        )
        buf = io.BytesIO()
        pq.write_table(t, buf, row_group_size=256)
        rel = f"shards/part-{len(files):05d}.parquet"
        ds.write_bytes(rel, buf.getvalue())
        files.append({"path": rel, "rows": n})
    finish_write(
        ds,
        {
            "kind": "images",
            "files": files,
            "classes": ["a", "b", "c", "d"],
            "num_images": n_images,
            "splits": {"train": {"total": n_images}},
        },
    )
    a = rng.integers(0, n_images, n_pairs * 2)
    b = rng.integers(0, n_images, n_pairs * 2)
    key = np.unique(a.astype(np.int64) * n_images + b)
    key = key[(key // n_images) != (key % n_images)][:n_pairs]
    rng.shuffle(key)
    loc = begin_write(str(root / "pairs"))
    t = pa.table(
        {
            "anchor_id": ids[key // n_images],
            "positive_id": ids[key % n_images],
            "similarity": rng.uniform(0.96, 0.99, len(key)).astype(np.float32),
            "rank": np.zeros(len(key), np.int32),
        }
    )
    buf = io.BytesIO()
    pq.write_table(t, buf)
    loc.write_bytes("pairs/part-00000.parquet", buf.getvalue())
    finish_write(
        loc,
        {
            "kind": "pairs",
            "dataset": {"uri": ds.uri},
            "files": {"pairs": "pairs/part-00000.parquet"},
            "lo": 0.96,
            "hi": 0.99,
            "num_pairs": len(key),
        },
    )
    return loc.uri


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:
        return bytes(r.read())


def page(base: str, n: int, per_page: int, pool: ThreadPoolExecutor) -> float:
    """One page as the browser loads it: the JSON, then its images, 6 connections at a time."""
    t0 = time.perf_counter()
    data = json.loads(get(f"{base}api/pairs?page={n}&per_page={per_page}&decision=undecided"))
    ids = [p[k] for p in data["pairs"] for k in ("anchor", "positive")]
    list(pool.map(lambda i: get(f"{base}img/{i}"), ids))
    return time.perf_counter() - t0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--pages", type=int, default=20)
    ap.add_argument("--per-page", type=int, default=48)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="sepp-curate-bench-"))
    t0 = time.perf_counter()
    pairs = make(root, args.images, args.pairs)
    made = time.perf_counter() - t0
    code = (
        "from sepp_ray.curate.command import CurateConfig, run_curate; "
        f"run_curate(CurateConfig(pairs={pairs!r}, port=0))"
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().split(" at ", 1)[1].strip()
        started = time.perf_counter() - t0
        with ThreadPoolExecutor(6) as pool:
            first = page(base, 0, args.per_page, pool)
            times = [page(base, n, args.per_page, pool) for n in range(1, args.pages + 1)]
            body = json.dumps({"decision": "accept", "filter": {"lo": "0.97", "hi": "0.975"}})
            req = urllib.request.Request(
                f"{base}api/decide-matching",
                data=body.encode(),
                headers={"Content-Type": "application/json"},
            )
            t1 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as r:
                changed = json.loads(r.read())["changed"]
            band = time.perf_counter() - t1
        rss = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    out = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "images": args.images,
        "pairs": args.pairs,
        "per_page": args.per_page,
        "data_seconds": round(made, 1),
        "server_start_seconds": round(started, 2),
        "first_page_seconds": round(first, 3),
        "page_seconds_median": round(float(np.median(times)), 3),
        "page_seconds_max": round(float(np.max(times)), 3),
        "band_decision": {"pairs": changed, "seconds": round(band, 3)},
        "server_rss_mib": round(rss, 1),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
