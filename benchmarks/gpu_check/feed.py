"""Feed depth by measurement: how far the training feed should read, assemble and pin ahead.

The real data plane (`DataPlan.batches` of an ingested dataset, Ray read tasks, the prefetch
thread, the worker's pinned copies) feeds the device while a stand-in "trainer" takes a fixed
simulated step per batch: a host sleep of ``step_ms`` after the batch has landed on the device,
standing for a GPU-bound step during which the host only waits. Over a grid of
``FeedConfig.read_ahead`` x ``FeedConfig.prefetch_batches`` x pinned memory (on CUDA only), it
reports batches/s and the fraction of time the trainer waited for data (blocked in the feed, and
on the copy to the device), and whether the defaults come within 5% of the best setting.

    python -m benchmarks.gpu_check.feed --dataset /path/to/ingested --batch 64 --step-ms 20
    python -m benchmarks.gpu_check.feed --cifar ../shared/data/cifar10-jpeg.tar.gz --images 10000

The GPU check runs it as its ``feed`` part (`feed_part`).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check.common import PartContext
from sepp_ray.train.dataplane import DataPlan
from sepp_ray.train.feed import FeedConfig
from sepp_ray.train.rank_data import _on_device

Batch = dict[str, Any]


@dataclass(frozen=True)
class Setting:
    """One point of the grid."""

    read_ahead: int | None  # None: FeedConfig's automatic choice (the node's spare CPUs)
    prefetch_batches: int
    pinned: bool

    @classmethod
    def of(cls, row: dict[str, Any]) -> Setting:
        return cls(row["read_ahead"], row["prefetch_batches"], row["pinned"])

    def label(self) -> str:
        pin = "pinned" if self.pinned else "pageable"
        ahead = "auto" if self.read_ahead is None else self.read_ahead
        return f"read_ahead {ahead}, prefetch {self.prefetch_batches}, {pin}"


def defaults(cuda: bool) -> Setting:
    """The settings a run gets today: FeedConfig's fields; the worker pins whenever on CUDA."""
    f = FeedConfig(local_batch=1)
    return Setting(f.read_ahead, f.prefetch_batches, cuda)


def pin_ahead() -> int:
    """How many batches the worker pins ahead (`_on_device`'s default, fixed in this grid)."""
    return int(inspect.signature(_on_device).parameters["pin_ahead"].default)


def grid(tiny: bool, cuda: bool) -> list[Setting]:
    """read_ahead {2, 8, 16} x prefetch {1, 2, 4} x pinned {on, off} (off only without CUDA);
    tiny: {2, 8} x {1, 2}; the defaults' values added where they are not among them."""
    ahead, prefetch = ((2, 8), (1, 2)) if tiny else ((2, 8, 16), (1, 2, 4))
    d = defaults(cuda)
    ahead_all = tuple(dict.fromkeys((*ahead, d.read_ahead)))
    prefetch = tuple(dict.fromkeys((*prefetch, d.prefetch_batches)))
    pins = (True, False) if cuda else (False,)
    return [Setting(a, p, q) for a, p, q in itertools.product(ahead_all, prefetch, pins)]


def open_plan(uri: str, batch: int, seed: int = 0) -> DataPlan:
    """A one-rank DataPlan over the dataset's train split, full images (stored uniform size)."""
    from sepp_ray.data.dataset import ImageDataset
    from sepp_ray.errors import SeppError
    from sepp_ray.train.census import census
    from sepp_ray.train.dataplane import image_files
    from sepp_ray.train.decode import DecodeSpec
    from sepp_ray.train.plan import total_rows

    ds = ImageDataset.open(uri)
    sizes = ds.manifest.get("image_size", {})
    if not sizes.get("uniform") or sizes["width"][0] != sizes["height"][0]:
        raise SeppError(f"{uri} holds images of mixed sizes: ingest with images.resize=32")
    chunks = census(image_files(ds), "images", "train", None)
    steps = total_rows(chunks) // batch
    if steps < 1:
        raise SeppError(f"{uri} has fewer than {batch} train images: lower --batch")
    spec = DecodeSpec("full", int(sizes["width"][0]), split="train")
    return DataPlan(chunks, spec, FeedConfig(local_batch=batch), batch, steps, 10**9, seed)


def _device_batches(
    data: DataPlan, s: Setting, device: torch.device, epochs: int
) -> Iterator[Batch]:
    """Batches on the device as the worker gets them, ``epochs`` whole epochs (a fresh feed
    each, run to its end, so no read task outlives the measurement)."""
    from dataclasses import replace

    feed = replace(data.feed, read_ahead=s.read_ahead, prefetch_batches=s.prefetch_batches)
    plan = replace(data, feed=feed)
    for epoch in range(epochs):
        batches = plan.batches(epoch, 1, 0)
        if s.pinned:  # the worker's path on CUDA: pinned `pin_ahead` ahead, async copy
            yield from _on_device(batches, device)
        else:
            for b in batches:
                yield {k: torch.from_numpy(v).to(device) for k, v in b.items()}


def measure(data: DataPlan, s: Setting, device: torch.device, epochs: int, step_s: float) -> dict:
    """Simulated steps over ``epochs`` epochs: batches/s and the share of wall time spent
    waiting for data (in the feed, and on the copy to the device)."""
    it = _device_batches(data, s, device, epochs)
    waited, rows, n = 0.0, 0, 0
    t0 = time.perf_counter()
    while True:
        t = time.perf_counter()
        b = next(it, None)
        if b is None:
            break
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the copy is on the step's stream: it comes first
        waited += time.perf_counter() - t
        rows, n = rows + len(b["id"]), n + 1
        time.sleep(step_s)
    total = time.perf_counter() - t0
    return {
        **asdict(s),
        "steps": n,
        "batches_per_s": round(n / total, 2),
        "images_per_s": round(rows / total, 1),
        "wait_fraction": round(waited / total, 3),
    }


def run_grid(
    data: DataPlan, settings: list[Setting], device: torch.device, epochs: int, step_s: float,
    repeats: int = 1,
) -> list[dict]:  # fmt: skip
    """Every setting ``repeats`` times (forward, then reversed order, so drift cancels), after an
    untimed warm-up that starts the Ray read workers; the mean per setting."""
    warm = Setting(max(x.read_ahead or 0 for x in settings) or None, 1, False)
    measure(data, warm, device, 1, 0.0)
    runs: dict[Setting, list[dict]] = {s: [] for s in settings}
    for r in range(repeats):
        for s in settings if r % 2 == 0 else settings[::-1]:
            runs[s].append(measure(data, s, device, epochs, step_s))
    out = []
    for rs in runs.values():
        row = dict(rs[0])
        for k in ("batches_per_s", "images_per_s", "wait_fraction"):
            row[k] = round(sum(x[k] for x in rs) / len(rs), 3)
        out.append(row)
    return out


def verdict(rows: list[dict], default: Setting) -> dict[str, Any]:
    """The best setting by batches/s and the defaults' share of it (target >= 0.95)."""
    best = max(rows, key=lambda r: r["batches_per_s"])
    ratio = (
        next(r for r in rows if Setting.of(r) == default)["batches_per_s"] / best["batches_per_s"]
    )
    best_label, ok = Setting.of(best).label(), ratio >= 0.95
    return {"best": best_label, "defaults": default.label(), "ratio": round(ratio, 3), "ok": ok}


def table(rows: list[dict], step_ms: float) -> str:
    lines = [
        f"simulated step: host sleep of {step_ms:g} ms after the batch is on the device",
        "| read_ahead | prefetch | pinned | batches/s | images/s | waited |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['read_ahead']} | {r['prefetch_batches']} | {r['pinned']} | "
            f"{r['batches_per_s']} | {r['images_per_s']} | {100 * r['wait_fraction']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def feed_part(ctx: PartContext) -> None:
    """The GPU check's ``feed`` part: the grid on a synthetic dataset, a simulated step of 512
    pairs at the Ray Train target (24,000 pairs/s), the rate the feed must keep up with."""
    from benchmarks.gpu_check.common import sizes, synthetic_dataset
    from sepp_ray.ray_utils import init_ray

    s, device = sizes(ctx.tiny), ctx.device
    init_ray()
    root = tempfile.mkdtemp(prefix="sepp-gpu-check-")
    data = open_plan(synthetic_dataset(s["n_images"], s["size"], root), s["batch"])
    step_ms = 10.0 if ctx.tiny else round(1000 * s["batch"] / 24000, 1)
    cuda = device.type == "cuda"
    rows = run_grid(data, grid(ctx.tiny, cuda), device, 2, step_ms / 1000, 1)
    v = verdict(rows, defaults(cuda))
    (ctx.out / "feed.md").write_text(table(rows, step_ms))
    what = f"feed: simulated step (host sleep after the batch is on {device.type}), pin_ahead "
    ctx.add(what + str(pin_ahead()), step_ms, "ms")
    for r in rows:
        label = Setting.of(r).label()
        ctx.add(f"feed {label}: batches/s", r["batches_per_s"], "batches/s")
        ctx.add(f"feed {label}: waited", r["wait_fraction"], "of time")
    ctx.add("feed best setting", v["best"])
    ctx.add(f"feed defaults ({v['defaults']}) / best", v["ratio"], "x", ">= 0.95", v["ok"])


def _cifar_dataset(tar: str, n: int, root: Path) -> str:
    """The first ``n`` CIFAR-10 train JPEGs (32 px) written as image shards, as ingest does."""
    from benchmarks.dataplane import cifar_blobs, write_dataset

    items = cifar_blobs(tar, n)
    write_dataset(root, [b for b, _ in items], [lab for _, lab in items], (32, 32), 1000)
    return str(root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="an ingested dataset stored at one size")
    src.add_argument("--cifar", help="cifar10-jpeg.tar.gz: its first --images train JPEGs")
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--step-ms", type=float, nargs="+", default=[20.0])
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per setting")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny-grid", action="store_true", help="read_ahead {2,8} x prefetch {1,2}")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    from sepp_ray.ray_utils import init_ray

    init_ray()
    uri = args.dataset or _cifar_dataset(
        args.cifar, args.images, Path(tempfile.mkdtemp(prefix="sepp-feed-")) / "cifar"
    )
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    data = open_plan(uri, args.batch)
    result = []
    for ms in args.step_ms:
        rows = run_grid(
            data, grid(args.tiny_grid, cuda), device, args.epochs, ms / 1000, args.repeats
        )
        v = verdict(rows, defaults(cuda))
        print(table(rows, ms))
        print(f"best: {v['best']}; defaults ({v['defaults']}) at {v['ratio']} of it\n", flush=True)
        result.append({"step_ms": ms, "rows": rows, **v})
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
