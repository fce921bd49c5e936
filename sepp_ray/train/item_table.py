"""The run's pair-item table: the images an `ItemPlan` names, fetched from the shards and written
once per run under ``OUT/items``.

Images are routed, not copied per pair: each image travels once to every output partition
(``unit mod parts``) whose items name it, so an image named by 30,000 pairs (a "hub") crosses
the shuffle at most ``parts`` times; each partition then copies its images into its own rows.
An Arrow binary array stops at 2 GiB, and a shard's requests copied once per pair pass that
easily (772,632 pairs over 9,500 images of 64 px did), so every array this module builds is cut
by bytes (`byte_pieces`, at most ``piece_bytes``). Small tables are assembled in one Ray task,
large ones by a Ray Data hash shuffle; both run outside a sweep trial's placement group. The
table's size is estimated from the plan and said before it is built, and refused past a bound.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sepp_ray.errors import SeppError
from sepp_ray.train.items import ItemPlan

ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("image2", pa.binary(), nullable=True),  # null: the same image as `image`
        pa.field("label", pa.int32(), nullable=True),  # the label of `image`
        pa.field("kind", pa.int8(), nullable=False),
        pa.field("group", pa.int64(), nullable=False),  # -1, or the group of a grouped image
        pa.field("pos_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),  # the image behind `image`
        pa.field("image2_id", pa.int64(), nullable=False),  # the image behind `image2`; -1: same
    ]
)
# part of the plan hash: a table written with other columns is rebuilt, never reused
ITEM_TABLE_VERSION = 2
ROUTED = pa.schema(
    [("part", pa.int64()), ("id", pa.int64()), ("image", pa.binary()), ("label", pa.int32())]
)
SUMMARY = pa.schema(
    [
        ("file", pa.string()),
        ("rows", pa.int64()),
        ("missing", pa.int64()),
        ("examples", pa.list_(pa.int64())),
    ]
)
ROW_GROUP = 256
PIECE_BYTES = 2**27  # image bytes of one Arrow array here (far below the 2 GiB of a binary one)
PART_BYTES = 2**28  # item bytes per shuffle partition, i.e. per file of the table
MAX_PARTS = 1024
ONE_TASK_BYTES = 2**28  # item tables of less are assembled in one task


def byte_pieces(sizes: np.ndarray, budget: int, step: int = 1) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` runs of rows, cut at multiples of ``step`` rows, each of at
    most ``budget`` bytes unless a single step of rows is larger: how rows are taken into Arrow
    arrays that stay far below the 2 GiB a binary array holds."""
    n = len(sizes)
    if n == 0:
        return []
    starts = np.arange(0, n, max(1, step))
    cum = np.cumsum(np.add.reduceat(np.asarray(sizes, np.int64), starts))
    out, k = [], 0
    while k < len(starts):
        base = int(cum[k - 1]) if k else 0
        stop = max(int(np.searchsorted(cum, base + budget, "right")), k + 1)
        out.append((int(starts[k]), int(starts[stop]) if stop < len(starts) else n))
        k = stop
    return out


def _lengths(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.binary_length(col).fill_null(0).to_numpy(zero_copy_only=False), np.int64)


class _Route:
    """Image shard rows -> one row per (image, partition whose items name it), in pieces of at
    most ``piece_bytes`` of images."""

    def __init__(self, plan: ItemPlan, split: str, parts: int, piece_bytes: int) -> None:
        named = plan.b >= 0
        ids = np.concatenate([plan.a, plan.b[named]])
        part = np.concatenate([plan.unit, plan.unit[named]]) % parts
        both = np.unique(np.stack([ids, part]), axis=1)  # sorted by image id, then partition
        self.ids, self.part = both[0], both[1]
        self.split = split
        self.piece_bytes = piece_bytes

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        batch = batch.filter(pc.equal(batch["split"], self.split))
        sent = False
        for rb in batch.to_batches():  # a chunk's arrays already hold less than 2 GiB
            for t in self._route(rb):
                sent = True
                yield t
        if not sent:
            yield ROUTED.empty_table()

    def _route(self, rb: pa.RecordBatch) -> Iterator[pa.Table]:
        ids = np.asarray(rb.column("id").to_numpy(zero_copy_only=False), np.int64)
        lo = np.searchsorted(self.ids, ids, "left")
        n = np.searchsorted(self.ids, ids, "right") - lo
        total = int(n.sum())
        src = np.repeat(np.arange(len(ids)), n)  # the batch row of each routed row
        req = np.arange(total) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
        images, labels = rb.column("image"), rb.column("label")
        for a, b in byte_pieces(_lengths(images)[src], self.piece_bytes):
            take = pa.array(src[a:b], pa.int64())
            cols = [self.part[req[a:b]], ids[src[a:b]], images.take(take), labels.take(take)]
            yield pa.Table.from_arrays(cols, schema=ROUTED)


def unit_order(units: np.ndarray, seed: int) -> np.ndarray:
    """Row order of a file: its units in a seeded order, the rows of a unit together and in
    plan order (a group's images then share a row group, hence a batch)."""
    uniq, first, inv = np.unique(units, return_index=True, return_inverse=True)
    appear = np.empty(len(uniq), np.int64)
    appear[np.argsort(first)] = np.arange(len(uniq))
    key = np.random.default_rng([seed, int(units[0]) & 0xFFFF]).permutation(len(uniq))
    return np.argsort(key[appear[inv]], kind="stable")


def _positions(have: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Row of each wanted image id among ``have`` (its first), -1 where absent."""
    uniq, first = np.unique(have, return_index=True)
    if not len(uniq):
        return np.full(len(want), -1, np.int64)
    k = np.clip(np.searchsorted(uniq, want), 0, len(uniq) - 1)
    return np.where(uniq[k] == want, first[k], -1)


def _take_source(col: pa.ChunkedArray) -> pa.Array:
    """One array to take images from: large_binary past 1 GiB, whose offsets cannot overflow."""
    if col.nbytes > 2**30:
        col = col.cast(pa.large_binary())
    return col.combine_chunks()


class _Build:
    """One partition's routed images -> its item rows, written as one Parquet file in pieces of
    at most ``piece_bytes``; returns what it wrote and which rows lacked an image."""

    def __init__(
        self, plan: ItemPlan, parts: int, out_uri: str, seed: int, row_group: int, piece: int
    ) -> None:
        self.plan, self.parts, self.out_uri = plan, parts, out_uri
        self.seed, self.row_group, self.piece_bytes = seed, row_group, piece
        self.__name__ = "build_items"  # Ray Data names a map by its function

    def __call__(self, t: pa.Table) -> pa.Table:
        return self.build(t, int(t["part"][0].as_py()))

    def build(self, t: pa.Table, part: int) -> pa.Table:
        pl = self.plan
        rows = np.flatnonzero(pl.unit % self.parts == part)
        have = np.asarray(t["id"].to_numpy(), np.int64)
        i = _positions(have, pl.a[rows])
        j = np.where(pl.b[rows] >= 0, _positions(have, pl.b[rows]), -1)
        bad = (i < 0) | ((pl.b[rows] >= 0) & (j < 0))
        examples = np.where(i < 0, pl.a[rows], pl.b[rows])[bad][:5].tolist()
        keep, i, j = rows[~bad], i[~bad], j[~bad]
        uri = ""
        if len(keep):
            order = unit_order(pl.unit[keep], self.seed)
            uri = self._write(t, keep[order], i[order], j[order])
        summary = [[uri], [len(keep)], [int(bad.sum())], [examples]]
        return pa.Table.from_arrays([pa.array(c) for c in summary], schema=SUMMARY)

    def _write(self, t: pa.Table, rows: np.ndarray, i: np.ndarray, j: np.ndarray) -> str:
        from sepp_ray.storage import filesystem

        src = _take_source(t["image"])
        labels = t["label"].combine_chunks()
        lens = _lengths(src)
        sizes = lens[i] + np.where(j >= 0, lens[np.maximum(j, 0)], 0)
        fs, base = filesystem(self.out_uri)
        fs.makedirs(base, exist_ok=True)
        name = f"part-{uuid.uuid4().hex[:12]}.parquet"
        with fs.open(f"{base}/{name}", "wb") as f, pq.ParquetWriter(f, ITEM_SCHEMA) as w:
            for a, b in byte_pieces(sizes, self.piece_bytes, self.row_group):
                piece = self._piece(src, labels, rows[a:b], i[a:b], j[a:b])
                w.write_table(piece, row_group_size=self.row_group)
        return f"{self.out_uri.rstrip('/')}/{name}"

    def _piece(
        self, src: pa.Array, labels: pa.Array, rows: np.ndarray, i: np.ndarray, j: np.ndarray
    ) -> pa.Table:
        pl = self.plan
        first = pa.array(i, pa.int64())
        image = src.take(first).cast(pa.binary())
        image2 = src.take(pa.array(j, pa.int64(), mask=j < 0)).cast(pa.binary())
        cols = {
            "item_id": pl.item_id[rows],
            "image": image,
            "image2": image2,
            "label": labels.take(first),
            "kind": pl.kind[rows],
            "group": pl.group[rows],
            "pos_ids": pa.array([pl.pos[r] for r in rows.tolist()], pa.list_(pa.int64())),
            "image_id": pl.a[rows],
            "image2_id": pl.b[rows],
        }
        return pa.table(cols, schema=ITEM_SCHEMA)


def image_bytes(files: list[str], fs: Any, sample: int = 16) -> float:
    """Mean stored bytes of an image, from the Parquet footers of shards spread over the list
    (no data read)."""
    size = rows = 0
    for path in files[:: max(1, len(files) // sample)][:sample]:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        col = meta.schema.to_arrow_schema().get_field_index("image")
        for g in range(meta.num_row_groups):
            size += meta.row_group(g).column(col).total_uncompressed_size
            rows += meta.row_group(g).num_rows
    return size / max(rows, 1)


@dataclass(frozen=True)
class ItemEstimate:
    """The item table's size, from the plan's image copies and the dataset's mean image."""

    items: int
    copies: int  # images stored: one per item, two for an item of two images
    distinct: int  # distinct images named
    most_named: int  # copies of the image named most (a hub)
    mean_bytes: float

    @property
    def bytes(self) -> float:
        return self.copies * self.mean_bytes

    def line(self) -> str:
        return (
            f"pair-item table: about {self.bytes / 2**30:.2f} GiB to write ({self.items:,} "
            f"items holding {self.copies:,} image copies of ~{self.mean_bytes:,.0f} bytes; "
            f"{self.distinct:,} distinct images, the most named one {self.most_named:,} times)"
        )


def estimate(plan: ItemPlan, mean_bytes: float) -> ItemEstimate:
    named = np.concatenate([plan.a, plan.b[plan.b >= 0]])
    _, counts = np.unique(named, return_counts=True)
    most = int(counts.max()) if len(counts) else 0
    return ItemEstimate(plan.rows, len(named), len(counts), most, mean_bytes)


def check_size(est: ItemEstimate, max_gb: float | None) -> None:
    """Say the table's size; refuse it past ``max_gb`` GiB, with the ways to a smaller one."""
    from sepp_ray.console import say

    say(est.line())
    if max_gb is not None and est.bytes > max_gb * 2**30:
        raise SeppError(
            f"the pair-item table would hold about {est.bytes / 2**30:.1f} GiB "
            f"({est.copies:,} image copies for {est.items:,} items), above "
            f"max_item_table_gb={max_gb:g}: mine fewer pairs (cap them per anchor with the "
            "mining option `m`, or raise its lower threshold `lo`), or raise max_item_table_gb"
        )


def _route_file(route: _Route, fs: Any, path: str) -> Iterator[pa.Table]:
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            yield from route(pf.read_row_group(g, columns=["id", "image", "label", "split"]))


def _in_one_task(
    plan: ItemPlan, files: list[str], fs: Any, split: str, build: _Build, piece: int
) -> list[dict[str, Any]]:
    """A small item table without a shuffle: one task routes the shards' named images (each
    once), assembles every unit and writes one file."""
    route = _Route(plan, split, 1, piece)
    routed = [t for path in files for t in _route_file(route, fs, path)]
    return build.build(pa.concat_tables(routed), 0).to_pylist()


def _shuffled(
    plan: ItemPlan, files: list[str], fs: Any, split: str, build: _Build, piece: int
) -> list[dict[str, Any]]:
    """A large item table: a Ray Data job (read shards -> route each named image to the
    partitions that need it -> hash shuffle by partition -> build and write each)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(files, filesystem=fs, columns=["id", "image", "label", "split"])
    ds = ds.map_batches(_Route(plan, split, build.parts, piece), batch_format="pyarrow")
    ds = ds.groupby("part", num_partitions=build.parts).map_groups(build, batch_format="pyarrow")
    return ds.take_all()


def write_item_table(
    plan: ItemPlan,
    image_files: list[str],
    fs: Any,
    split: str,
    out_uri: str,
    seed: int = 0,
    one_task_bytes: int = ONE_TASK_BYTES,
    *,
    max_gb: float | None = None,
    piece_bytes: int = PIECE_BYTES,
    part_bytes: int = PART_BYTES,
) -> list[str]:
    """Fetch the images the plan names and write the run's item table under ``out_uri``;
    returns its files. Its size is said first, and refused past ``max_gb`` GiB. Up to
    ``one_task_bytes`` of items, one task assembles it; beyond, a Ray Data hash shuffle does,
    in partitions of ~``part_bytes``. Raises SeppError when pairs name images absent from
    ``split``."""
    import ray

    if plan.rows == 0:
        return []
    from sepp_ray.train.census import outside_placement_group

    est = estimate(plan, image_bytes(image_files, fs))
    check_size(est, max_gb)
    # row groups are the unit ranks take: small enough that even a small table spreads over
    # the epoch and the ranks (at least ~64 of them), at most ROW_GROUP rows and a piece
    row_group = int(np.clip(plan.rows // 64, 16, ROW_GROUP))
    row_group = max(1, min(row_group, int(piece_bytes // max(2 * est.mean_bytes, 1))))
    parts = int(np.clip(math.ceil(est.bytes / part_bytes), 1, MAX_PARTS))
    one = est.bytes <= one_task_bytes
    build = _Build(plan, 1 if one else parts, out_uri, seed, row_group, piece_bytes)
    # run outside any placement group (a sweep trial's is sized for its own actor)
    run = ray.remote(num_cpus=0.5 if one else 0)(_in_one_task if one else _shuffled)
    task = run.options(scheduling_strategy=outside_placement_group())
    results = ray.get(task.remote(plan, image_files, fs, split, build, piece_bytes))
    return _files_or_refusal(plan, results, split)


def _files_or_refusal(plan: ItemPlan, results: list[dict[str, Any]], split: str) -> list[str]:
    files = sorted(r["file"] for r in results if r["file"])
    missing = sum(int(r["missing"]) for r in results)
    written = sum(int(r["rows"]) for r in results)
    if missing or written != plan.rows:
        examples = [x for r in results for x in r["examples"]][:5]
        raise SeppError(
            f"the pairs name image id(s) absent from split {split!r} of the dataset "
            f"({plan.rows - written} item(s); e.g. image ids {examples}): were they mined on "
            "another dataset or split?"
        )
    return files
