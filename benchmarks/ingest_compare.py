"""The streaming feed against Ray Data's standard training ingest, both warm, side by side.

Same shards, same decode and crop work (`decode_rows` with one `DecodeSpec`), same batch and
shuffle-buffer rows, one rank and two. Each rank is a consumer actor (no CPU reserved, like a
trainer that waits on its data) that counts its batches:

- feed: `DataPlan.stream` (Ray read-and-decode tasks, the seeded shuffle buffer, one pipeline
  across epochs), as a training worker runs it;
- Ray Data: ``read_parquet`` -> ``randomize_block_order(seed)`` (a new seeded order every
  execution, i.e. every epoch) -> ``map_batches`` (decode) -> ``streaming_split(n,
  equal=True)``; each rank iterates ``iter_batches`` with ``local_shuffle_buffer_size``.

Ray Data's target block size is set to about a read task's encoded input (``--block-mb``): at
its default the shards read as one block, decoded by one task. A round builds one mechanism's
consumers, runs one untimed warm-up epoch, then times ``--epochs`` epochs (images/s over all
ranks); rounds alternate which mechanism goes first. Images: real CIFAR-10 JPEGs at 32 px
(full decode) and the same re-encoded at 341x256 (random resized crop to 224 on the CPU, two
views), as `benchmarks/dataplane.py` writes them.

    python benchmarks/ingest_compare.py --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dataplane import cifar_blobs, upscale, write_dataset  # noqa: E402

from sepp_ray.train.decode import CropSpec, DecodeSpec, decode_rows  # noqa: E402


class DecodeBatch:
    """Ray Data's decode stage: the feed's own `decode_rows`, crops seeded from the rows' ids."""

    def __init__(self, spec: DecodeSpec) -> None:
        self.spec = spec

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        import pyarrow.compute as pc

        if self.spec.split is not None:
            table = table.filter(pc.equal(table["split"], self.spec.split))
        ids = table["id"].to_numpy()
        rng = np.random.default_rng([int(ids[0]) if len(ids) else 0, len(ids)])
        return decode_rows(table.drop_columns(["split"]), self.spec, rng)


def _consumer() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Rank:
        """One rank's consumer: the feed's stream, or a Ray Data split iterator."""

        def __init__(self, mech: str, source: Any, world: int, rank: int, batch: int, buf: int):
            self.rank, self.batch, self.buf = rank, batch, buf
            self.source = source
            self.stream = source.stream(world, rank, 0) if mech == "feed" else None
            self.epoch = 0

        def run_epoch(self) -> int:
            if self.stream is not None:
                it = self.stream.epoch(self.epoch)
            else:
                it = self.source.iter_batches(
                    batch_size=self.batch,
                    local_shuffle_buffer_size=self.buf,
                    local_shuffle_seed=1000 * self.epoch + self.rank,
                    drop_last=True,
                    prefetch_batches=2,
                )
            self.epoch += 1
            return sum(len(b["id"]) for b in it)

    return Rank


def _epochs(ranks: list[Any], n: int) -> float:
    """Images/s of ``n`` epochs over all ranks (each epoch: every rank's batches, together)."""
    import ray

    t0 = time.perf_counter()
    rows = sum(sum(ray.get([r.run_epoch.remote() for r in ranks])) for _ in range(n))
    return rows / (time.perf_counter() - t0)


def _feed_plan(chunks: list[Any], spec: DecodeSpec, batch: int, buf: int, epochs: int) -> Any:
    from sepp_ray.train.dataplane import DataPlan
    from sepp_ray.train.feed import FeedConfig
    from sepp_ray.train.plan import total_rows

    steps = total_rows(chunks) // batch
    cfg = FeedConfig(local_batch=batch, buffer_rows=buf)  # read_ahead: auto
    return DataPlan(chunks, spec, cfg, batch, steps, epochs * steps, 0)


def run_round(
    mech: str,
    files: list[str],
    chunks: list[Any],
    spec: DecodeSpec,
    world: int,
    batch: int,
    buf: int,
    epochs: int,
) -> float:
    """One mechanism, ``world`` ranks: a warm-up epoch, then ``epochs`` timed ones."""
    from dataclasses import replace

    import ray

    rank_cls = _consumer()
    local = batch // world
    if mech == "feed":
        # planned one epoch past the timed ones: the last timed epoch then reads ahead into the
        # next as every epoch does, and the reads ahead into the first timed one are paid for
        plan = _feed_plan(chunks, spec, batch, buf, epochs + 2)
        plan = replace(plan, feed=replace(plan.feed, local_batch=local))
        sources: list[Any] = [plan] * world
    else:
        ds = (
            ray.data.read_parquet(files, columns=["id", "image", "label", "split"])
            .randomize_block_order(seed=0)
            .map_batches(DecodeBatch(spec), batch_format="pyarrow", batch_size=None)
        )
        sources = ds.streaming_split(world, equal=True)
    ranks = [rank_cls.remote(mech, sources[r], world, r, local, buf) for r in range(world)]
    _epochs(ranks, 1)  # warm-up: worker processes, imports, the coordinator
    rate = _epochs(ranks, epochs)
    for r in ranks:
        ray.kill(r)
    return rate


def _datasets(tar: str, n: int, work: Path) -> list[tuple[str, Path, DecodeSpec, int]]:
    items = cifar_blobs(tar, n)
    labels = [lab for _, lab in items]
    crop = DecodeSpec("crop", 224, view1=CropSpec(224), view2=CropSpec(224), split="train")
    big = [upscale(b) for b, _ in items[: max(1, n // 5)]]
    out = []
    for name, blobs, spec, side in (
        ("32 px JPEG, full", [b for b, _ in items], DecodeSpec("full", 32, split="train"), 32),
        ("256 px JPEG, RRC 224 on CPU", big, crop, 256),
    ):
        root = work / f"cmp-{side}"
        write_dataset(root, blobs, labels[: len(blobs)], (side, side), 1000)
        out.append((name, root, spec, len(blobs)))
    return out


def compare(
    tar: str,
    n: int,
    worlds: list[int],
    rounds: int,
    epochs: int,
    batch: int,
    work: Path,
    block_mb: float = 1.0,
) -> list[dict[str, Any]]:
    import ray

    from sepp_ray.data.dataset import ImageDataset
    from sepp_ray.train.census import census
    from sepp_ray.train.dataplane import image_files
    from sepp_ray.train.feed import FeedConfig, _buffer_rows

    ray.init(include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Ray Data's default (128 MiB blocks) reads these shards as one block and decodes it in one
    # task; blocks of about a read task's encoded input give it the same parallelism
    ctx.target_max_block_size = int(block_mb * 2**20)
    rows = []
    for name, root, spec, count in _datasets(tar, n, work):
        files = image_files(ImageDataset.open(str(root)))
        chunks = census(files, "images", "train", None)
        buf = _buffer_rows(FeedConfig(local_batch=batch), spec)
        for world in worlds:
            rates: dict[str, list[float]] = {"feed": [], "ray_data": []}
            for k in range(rounds):
                order = ("feed", "ray_data") if k % 2 == 0 else ("ray_data", "feed")
                for mech in order:
                    rate = run_round(mech, files, chunks, spec, world, batch, buf, epochs)
                    rates[mech].append(rate)
            res = {
                "images": name,
                "n": count,
                "ranks": world,
                "feed_per_s": round(float(np.median(rates["feed"]))),
                "ray_data_per_s": round(float(np.median(rates["ray_data"]))),
                "rounds": {k: [round(x) for x in v] for k, v in rates.items()},
            }
            res["ray_data_over_feed"] = round(res["ray_data_per_s"] / res["feed_per_s"], 2)
            print(json.dumps(res), flush=True)
            rows.append(res)
    ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--images", type=int, default=10_000, help="32 px images (224 px: a fifth)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs a round")
    ap.add_argument("--batch", type=int, default=256, help="global batch")
    ap.add_argument("--block-mb", type=float, default=1.0, help="Ray Data's target block size")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sepp-cmp-") as tmp:
        result = compare(
            args.data,
            args.images,
            args.ranks,
            args.rounds,
            args.epochs,
            args.batch,
            Path(tmp),
            args.block_mb,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
