"""Is the `sepp curate` page responsive on a large mining result? Time to first page, time per
page (the JSON of a page and every image on it, as the browser asks for them), bytes the server
read per page, and its memory, on generated pairs over generated images (4 classes).

Local PNG shards (32 px), the responsiveness check:

    python benchmarks/curate.py --images 20000 --pairs 100000 --pages 20

224 px JPEG shards on an S3 server (moto, in this process, on 127.0.0.1), against the server
of another source tree (e.g. the last commit's, unpacked with
`git archive HEAD sepp_ray | tar -x -C /tmp/base`), in alternating rounds:

    python benchmarks/curate.py --s3 --size 224 --images 12000 --pairs 50000 --pages 6 \
        --rounds 2 --cache-mb 16 512 --baseline-src /tmp/base
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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sepp_ray.data.schema import IMAGE_SCHEMA
from sepp_ray.storage import begin_write, finish_write

REPO = Path(__file__).resolve().parents[1]
TOKEN = "benchmark-token-0123456789"
S3_SENT = [0]  # bytes the S3 server has sent in answers to GETs


def encode(rng: np.random.Generator, label: int, size: int) -> bytes:
    """PNG noise at 32 px; at larger sizes a smooth random picture with grain, as a JPEG of
    about the size of a real photo at that resolution (~20 KB at 224 px)."""
    buf = io.BytesIO()
    if size <= 32:
        px = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        px[..., label % 3] = 200
        Image.fromarray(px).save(buf, "PNG")
        return buf.getvalue()
    small = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
    big = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), np.float32)
    big[..., label % 3] += 40
    px = np.clip(big + rng.normal(0, 20, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(px).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_images(uri: str, ids: np.ndarray, size: int, rng: np.random.Generator) -> None:
    labels = (np.arange(len(ids)) % 4).astype(np.int32)
    ds = begin_write(uri)
    files: list[dict[str, Any]] = []
    per = 10_000
    for s in range(0, len(ids), per):
        n = min(per, len(ids) - s)
        t = pa.table(
            {
                "id": ids[s : s + n],
                "image": [encode(rng, int(labels[i]), size) for i in range(s, s + n)],
                "label": labels[s : s + n],
                "split": ["train"] * n,
                "key": [f"{i}.img" for i in range(s, s + n)],
            },
            schema=IMAGE_SCHEMA,
        )
        buf = io.BytesIO()
        pq.write_table(t, buf, row_group_size=256)  # as `sepp ingest` writes them
        rel = f"shards/part-{len(files):05d}.parquet"
        ds.write_bytes(rel, buf.getvalue())
        files.append({"path": rel, "rows": n})
    manifest = {"kind": "images", "files": files, "classes": ["a", "b", "c", "d"]}
    finish_write(ds, {**manifest, "num_images": len(ids), "splits": {"train": {"total": len(ids)}}})


def make(base: str, n_images: int, n_pairs: int, size: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**62, size=n_images, replace=False).astype(np.int64)
    make_images(f"{base}/images", ids, size, rng)
    a = rng.integers(0, n_images, n_pairs * 2)
    b = rng.integers(0, n_images, n_pairs * 2)
    key = np.unique(a.astype(np.int64) * n_images + b)
    key = key[(key // n_images) != (key % n_images)][:n_pairs]
    rng.shuffle(key)
    loc = begin_write(f"{base}/pairs")
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
    body = {"kind": "pairs", "dataset": {"uri": f"{base}/images"}, "lo": 0.96, "hi": 0.99}
    finish_write(
        loc, {**body, "files": {"pairs": "pairs/part-00000.parquet"}, "num_pairs": len(key)}
    )
    return loc.uri


def start_s3() -> str:
    """A moto S3 server on 127.0.0.1 with an empty bucket; returns the bucket's URI."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"  # type: ignore[union-attr]
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "SEPP_S3_ENDPOINT": endpoint,
        }
    )
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="curate-bench")
    app = server._server.app  # type: ignore[union-attr]

    def counted(environ: dict[str, Any], start_response: Any) -> Any:
        for chunk in app(environ, start_response):
            if environ["REQUEST_METHOD"] == "GET":
                S3_SENT[0] += len(chunk)
            yield chunk

    server._server.app = counted  # type: ignore[union-attr]
    return "s3://curate-bench"


def get(url: str, body: dict[str, Any] | None = None) -> bytes:
    headers = {"X-Sepp-Token": TOKEN, "Content-Type": "application/json"}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        return bytes(r.read())


def band(base: str) -> tuple[int, float]:
    """Accept a similarity band at once: the pairs changed and the seconds it took."""
    t0 = time.perf_counter()
    r = get(
        f"{base}api/decide-matching",
        {"decision": "accept", "filter": {"lo": "0.97", "hi": "0.975"}},
    )
    return json.loads(r)["changed"], time.perf_counter() - t0


def page(base: str, n: int, per_page: int, pool: ThreadPoolExecutor) -> float:
    """One page as the browser loads it: the JSON, then its images, 6 connections at a time."""
    t0 = time.perf_counter()
    data = json.loads(get(f"{base}api/pairs?page={n}&per_page={per_page}&decision=undecided"))
    ids = [p[k] for p in data["pairs"] for k in ("anchor", "positive")]
    list(pool.map(lambda i: get(f"{base}img/{i}"), ids))
    return time.perf_counter() - t0


def proc_stat(pid: int) -> tuple[float, float]:
    """Resident MiB and MiB read so far: from the S3 server when there is one, else from
    files."""
    rss = read = float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            read = int(line.split()[1]) / 2**20
    return rss, S3_SENT[0] / 2**20 if "SEPP_S3_ENDPOINT" in os.environ else read


def serve(pairs: str, src: Path, extra: str) -> tuple[subprocess.Popen[str], str, float]:
    """`sepp curate` of the tree ``src`` as its own process; its URL and start-up seconds."""
    code = (
        "from sepp_ray.curate.command import CurateConfig, run_curate; "
        f"run_curate(CurateConfig(pairs={pairs!r}, port=0{extra}))"
    )
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(src), "SEPP_CURATE_TOKEN": TOKEN}
    cmd = [sys.executable, "-c", code]  # run in src: `-c` puts the working directory first
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=src)
    assert proc.stdout is not None
    url = proc.stdout.readline().split(" at ", 1)[1].strip().split("?", 1)[0]
    return proc, url, time.perf_counter() - t0


def block(pairs: str, src: Path, extra: str, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh server (cold cache, empty decision log): the first page, then ``pages`` more,
    one after another, then a band decision."""
    decisions = tempfile.mkdtemp(prefix="sepp-curate-decisions-")
    proc, base, started = serve(pairs, src, f"{extra}, decisions={decisions!r}")
    try:
        times, mib = [], []
        with ThreadPoolExecutor(6) as pool:
            for n in range(args.pages + 1):
                before = proc_stat(proc.pid)[1]
                times.append(page(base, n, args.per_page, pool))
                mib.append(proc_stat(proc.pid)[1] - before)
                time.sleep(args.think)
        changed, band_s = band(base)
        rss = proc_stat(proc.pid)[0]
    finally:
        proc.terminate()
        proc.wait(10)
    return {
        "start": started,
        "first": times[0],
        "pages": times[1:],
        "mib": mib[1:],
        "band": (changed, band_s),
        "rss": rss,
    }


def summary(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    pages = [t for b in blocks for t in b["pages"]]
    mib = [m for b in blocks for m in b["mib"]]
    return {
        "server_start_seconds": round(float(np.median([b["start"] for b in blocks])), 2),
        "first_page_seconds": round(float(np.median([b["first"] for b in blocks])), 3),
        "page_seconds_median": round(float(np.median(pages)), 3),
        "page_seconds_max": round(float(np.max(pages)), 3),
        "read_mib_per_page_median": round(float(np.median(mib)), 1),
        "band_decision": {
            "pairs": blocks[0]["band"][0],
            "seconds": round(float(np.median([b["band"][1] for b in blocks])), 3),
        },
        "server_rss_mib": round(float(np.max([b["rss"] for b in blocks])), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--pages", type=int, default=20)
    ap.add_argument("--per-page", type=int, default=48)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--s3", action="store_true", help="data on a local moto S3 server")
    ap.add_argument("--baseline-src", type=Path, help="a source tree to compare with")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--think", type=float, default=0.0, help="seconds a user looks at a page")
    ap.add_argument(
        "--cache-mb", type=int, nargs="*", default=[], help="this tree's image cache, one run each"
    )
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    base = start_s3() if args.s3 else args.workdir or tempfile.mkdtemp(prefix="sepp-curate-")
    t0 = time.perf_counter()
    pairs = make(base, args.images, args.pairs, args.size)
    made = time.perf_counter() - t0
    variants = {f"this tree, cache_mb={m}": (REPO, f", cache_mb={m}") for m in args.cache_mb}
    variants = variants or {"this tree": (REPO, "")}
    if args.baseline_src:
        variants["baseline"] = (args.baseline_src.resolve(), "")
    blocks: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name in list(variants)[:: 1 if r % 2 else -1]:  # alternate which goes first
            blocks[name].append(block(pairs, *variants[name], args))
    out = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "storage": "moto S3 on 127.0.0.1" if args.s3 else "local files",
        **{k: getattr(args, k) for k in ("images", "pairs", "size", "per_page", "rounds")},
        "pages_per_round": args.pages,
        "think_seconds": args.think,
        "data_seconds": round(made, 1),
        **{name: summary(b) for name, b in blocks.items()},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
