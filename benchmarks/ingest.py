"""Ingest throughput on real images: the CIFAR-10 JPEG set (60,000 files, ImageFolder layout).

Measures, in one run, images/s of `sepp ingest` through Ray Data on this machine and of a bare
single-process loop doing the same per-image work (read, decode, validate), so the Ray overhead
and the parallel speed-up show as a ratio on the same machine at the same moment.

    python benchmarks/ingest.py --data ../shared/data/cifar10-jpeg.tar.gz [--limit N]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from sepp_ray.data.images import process
from sepp_ray.data.ingest import ImageOptions, ingest
from sepp_ray.data.sources import open_source


def unpack(archive: Path, dest: Path) -> Path:
    marker = dest / ".unpacked"
    if not marker.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        marker.touch()
    # the archive holds train/ and test/ at its top, possibly under one folder
    roots = [p for p in dest.rglob("train") if p.is_dir()]
    return roots[0].parent


def subset(root: Path, limit: int, dest: Path) -> Path:
    """Copy the first `limit` files (sorted) into a new tree, keeping the layout."""
    files = sorted(p for p in root.rglob("*.jpg"))[:limit]
    for f in files:
        target = dest / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    return dest


def bare_loop(root: Path, limit: int) -> float:
    files = sorted(root.rglob("*.jpg"))[:limit]
    t0 = time.perf_counter()
    for f in files:
        out = process(f.read_bytes())
        assert out.data is not None
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sepp-bench"))
    ap.add_argument("--limit", type=int, default=0, help="ingest only the first N files")
    ap.add_argument("--bare", type=int, default=5000, help="files for the bare-loop baseline")
    args = ap.parse_args()
    work = Path(args.workdir)
    root = unpack(Path(args.data), work / "cifar10")
    if args.limit:
        sub = work / f"subset-{args.limit}"
        root = sub if sub.exists() else subset(root, args.limit, sub)
    n_files = sum(1 for _ in root.rglob("*.jpg"))
    bare = bare_loop(root, args.bare)
    out = work / "out"
    from sepp_ray.ray_utils import init_ray

    t_init = time.perf_counter()
    init_ray()  # cluster start-up is paid once per job, not per image: timed apart
    t_init = time.perf_counter() - t_init
    t0 = time.perf_counter()
    src = open_source(str(root))
    m = ingest(src, str(out), ImageOptions(), overwrite=True)
    dt = time.perf_counter() - t0
    assert m["num_images"] == n_files, (m["num_images"], n_files)
    ray_rate = n_files / dt
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, {platform.python_version()}")
    print("| images | ray start s | ingest s | ray images/s | bare 1-process images/s | ratio |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {n_files} | {t_init:.1f} | {dt:.1f} | {ray_rate:.0f} | {bare:.0f} "
        f"| {ray_rate / bare:.2f} |"
    )


if __name__ == "__main__":
    main()
