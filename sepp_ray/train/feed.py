"""Feeding one rank: read its slices in parallel CPU tasks, decode, mix, cut into batches.

Each slice (a part of one row group, `sepp_ray.train.plan`) is read and decoded by a Ray task
scheduled on the rank's node, several ahead of the trainer (by default as many as the node has
spare CPUs); at small image sizes one task reads several consecutive slices, so its fixed cost
is spread over more rows. Results arrive in plan order, one block per slice, and go through a
seeded shuffle buffer (`sepp_ray.train.shuffle`), so for a given (seed, epoch, rank) the batches
are the same on every run, whatever the read-ahead. Rows of one multi-positive group (an anchor
and its positives, stored together in the pair-item table) move through the buffer as one unit,
so they land in the same batch. A `RankFeed` runs one pipeline of reads over all the epochs of a
run: the next epoch's reads are in flight while this epoch's last batches are consumed.

Decoding itself is `sepp_ray.train.decode`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem
from sepp_ray.train.census import row_filter
from sepp_ray.train.decode import (
    Batch,
    CropSpec,
    DecodeSpec,
    decode_on_device,
    decode_parts,
    decode_rows,
)
from sepp_ray.train.plan import Slice
from sepp_ray.train.shuffle import ShuffleBuffer, pack, unit_order, units_of

__all__ = [
    "Batch",
    "CropSpec",
    "DecodeSpec",
    "ShuffleBuffer",
    "decode_on_device",
    "decode_rows",
    "pack",
    "units_of",
]
T = TypeVar("T")
TASK_BYTES = 8 * 2**20  # decoded output a read task aims for (several slices of small images)
IN_FLIGHT_BYTES = 2**30  # decoded output in flight per rank, at most
MAX_READ_AHEAD = 64
# the columns decoding reads (never `key`, nor the item table's `kind`)
COLUMNS = ("id", "item_id", "image", "image2", "label", "split", "group", "pos_ids")
ITEM_IDS = ("image_id", "image2_id")


def _slice_table(
    part: Slice, spec: DecodeSpec, seed: int, epoch: int, exclude: np.ndarray | None
) -> tuple[pa.Table, np.random.Generator]:
    """One slice's rows (its row group, filtered as the census counted, in a fresh order every
    epoch that is the same for every rank, groups kept together: ranks sharing a row group take
    disjoint rows) and the generator of its crops, seeded by (seed, epoch, file, row group,
    start)."""
    c = part.chunk
    fs, path = filesystem(c.uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        wanted = [x for x in (*COLUMNS, *ITEM_IDS) if x in names]
        table = pf.read_row_group(c.row_group, columns=wanted)
    if c.table == "images":
        keep = np.flatnonzero(row_filter(table, spec.split, exclude))
    else:
        keep = np.arange(table.num_rows)
    if len(keep) != c.rows:
        raise SeppError(
            f"{c.uri} row group {c.row_group} holds {len(keep)} training rows, the plan "
            f"counted {c.rows}: the data changed under a running job"
        )
    key = [seed, epoch, zlib.crc32(c.uri.encode()), c.row_group]
    group = table["group"].to_numpy()[keep] if "group" in names else np.full(len(keep), -1)
    order = unit_order(group, np.random.default_rng([*key, 1]))
    rows = keep[order[part.start : part.stop]]
    return table.take(pa.array(rows)), np.random.default_rng([*key, 2, part.start])


def read_slices(parts: list[Slice], spec: DecodeSpec, seed: int, epoch: int) -> Batch:
    """Read consecutive slices and decode them into one batch (rows in slice order)."""
    exclude = spec.exclude
    if exclude is not None and not isinstance(exclude, np.ndarray):
        import ray

        exclude = ray.get(exclude)
    return decode_parts([_slice_table(p, spec, seed, epoch, exclude) for p in parts], spec)


def read_slice(part: Slice, spec: DecodeSpec, seed: int, epoch: int) -> Batch:
    """One slice's rows, decoded (see `read_slices`)."""
    return read_slices([part], spec, seed, epoch)


@dataclass(frozen=True)
class FeedConfig:
    """How a rank is fed: batch size, buffer, how far reading runs ahead."""

    local_batch: int
    buffer_rows: int = 4096  # shuffle buffer (rows); capped by buffer_bytes
    buffer_bytes: int = 512 * 2**20
    read_ahead: int | None = None  # read tasks in flight; None or 0: the node's spare CPUs
    prefetch_batches: int = 2  # batches assembled ahead of the trainer (a thread)
    task_cpus: float = 1.0


def _buffer_rows(cfg: FeedConfig, spec: DecodeSpec) -> int:
    per_row = spec.row_bytes()
    return max(cfg.local_batch, min(cfg.buffer_rows, cfg.buffer_bytes // max(per_row, 1)))


def task_groups(slices: list[Slice], spec: DecodeSpec) -> list[list[Slice]]:
    """Consecutive slices read by one task: about `TASK_BYTES` of decoded rows each."""
    target = max(1, TASK_BYTES // max(spec.row_bytes(), 1))
    out: list[list[Slice]] = []
    rows = target
    for s in slices:
        if rows >= target:
            out.append([])
            rows = 0
        out[-1].append(s)
        rows += s.rows
    return out


def node_spare_cpus() -> float:
    """CPUs free for tasks on this node now, from public Ray APIs only: the cluster's free CPUs,
    at most this node's own CPUs (Ray has no public per-node view of what is free)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    total = next(
        (float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("NodeID") == node),
        0.0,
    )
    free = float(ray.available_resources().get("CPU", 0.0))
    return min(total, free) if total else free


def auto_read_ahead(spare_cpus: float, task_cpus: float, task_bytes: int) -> int:
    """Tasks in flight: one per spare CPU plus two queued (the next one starts the moment one
    finishes), at least 2, at most `MAX_READ_AHEAD` and `IN_FLIGHT_BYTES` of decoded rows."""
    by_cpu = int(spare_cpus // max(task_cpus, 1e-3)) + 2
    by_bytes = max(2, IN_FLIGHT_BYTES // max(task_bytes, 1))
    return int(np.clip(by_cpu, 2, min(MAX_READ_AHEAD, by_bytes)))


@dataclass(frozen=True)
class EpochPart:
    """One epoch of one rank: its slices, in plan order, and the steps they make."""

    epoch: int
    slices: list[Slice]
    steps: int


def _reads(parts: Iterable[EpochPart], spec: DecodeSpec) -> Iterator[tuple[int, list[Slice]]]:
    """(epoch, slices of one task) over all epochs; (epoch, []) marks each epoch's end."""
    for p in parts:
        for group in task_groups(p.slices, spec):
            yield p.epoch, group
        yield p.epoch, []


def _split(block: Batch, group: list[Slice]) -> Iterator[Batch]:
    """A task's block as one view per slice (no copy): the buffer then sees the same blocks
    however slices were grouped into tasks."""
    at = 0
    for s in group:
        yield {k: v[at : at + s.rows] for k, v in block.items()}
        at += s.rows


class _Reader:
    """Decoded slice blocks in plan order over all epochs, ``read_ahead`` tasks in flight
    across epoch boundaries; (epoch, None) at each epoch's end."""

    def __init__(self, spec: DecodeSpec, seed: int, cfg: FeedConfig, use_ray: bool) -> None:
        self.spec, self.seed, self.cfg, self.use_ray = spec, seed, cfg, use_ray
        self.read_ahead = cfg.read_ahead or 0

    def blocks(self, parts: Iterable[EpochPart]) -> Iterator[tuple[int, Batch | None]]:
        reads = _reads(parts, self.spec)
        if not self.use_ray:
            for epoch, group in reads:
                if not group:
                    yield epoch, None
                    continue
                yield from ((epoch, b) for b in _split(self._read(group, epoch), group))
            return
        yield from self._remote(reads)

    def _read(self, group: list[Slice], epoch: int) -> Batch:
        return read_slices(group, self.spec, self.seed, epoch)

    def _task(self, first: list[Slice]) -> Any:
        """The remote reader; sizes the read-ahead first when it is automatic (a task's output
        is what `task_groups` aims for, or more when one slice alone is larger)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        if not self.read_ahead:
            task_bytes = max(TASK_BYTES, sum(s.rows for s in first) * self.spec.row_bytes())
            self.read_ahead = auto_read_ahead(node_spare_cpus(), self.cfg.task_cpus, task_bytes)
        return ray.remote(num_cpus=self.cfg.task_cpus)(read_slices).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)
        )

    def _remote(
        self, reads: Iterator[tuple[int, list[Slice]]]
    ) -> Iterator[tuple[int, Batch | None]]:
        import ray

        head = next(reads, None)
        if head is None:
            return
        task = self._task(head[1])
        reads = itertools.chain([head], reads)
        pending: list[tuple[int, list[Slice], Any]] = []
        in_flight = 0

        def submit() -> bool:
            nxt = next(reads, None)
            if nxt is None:
                return False
            epoch, group = nxt
            ref = task.remote(group, self.spec, self.seed, epoch) if group else None
            pending.append((epoch, group, ref))
            return True

        while in_flight < self.read_ahead and submit():
            in_flight += pending[-1][2] is not None
        while pending:
            epoch, group, ref = pending.pop(0)
            in_flight -= ref is not None
            while in_flight < self.read_ahead and submit():
                in_flight += pending[-1][2] is not None
            if ref is None:
                yield epoch, None
                continue
            yield from ((epoch, b) for b in _split(ray.get(ref), group))


def _mixed(
    blocks: Iterator[tuple[int, Batch | None]],
    spec: DecodeSpec,
    cfg: FeedConfig,
    seed: int,
    rank: int,
) -> Iterator[tuple[int, Batch | None]]:
    """Each epoch's blocks through its own seeded shuffle buffer: (epoch, batch), and
    (epoch, None) after an epoch's last batch."""
    buf: ShuffleBuffer | None = None
    for epoch, block in blocks:
        if buf is None:
            rng = np.random.default_rng([seed, epoch, rank, 7])
            buf = ShuffleBuffer(cfg.local_batch, _buffer_rows(cfg, spec), rng)
        if block is None:
            yield from ((epoch, b) for b in buf.flush())
            yield epoch, None
            buf = None
        else:
            yield from ((epoch, b) for b in buf.push(block))


def _checked(parts: Iterable[EpochPart], local_batch: int, rank: int) -> Iterator[EpochPart]:
    for p in parts:
        have, want = sum(s.rows for s in p.slices), p.steps * local_batch
        if have != want:
            raise SeppError(f"rank {rank} was planned {have} rows for {p.steps} steps of {want}")
        yield p


def rank_batches(
    slices: list[Slice],
    spec: DecodeSpec,
    cfg: FeedConfig,
    seed: int,
    epoch: int,
    rank: int,
    steps: int,
    use_ray: bool = True,
) -> Iterator[Batch]:
    """Exactly ``steps`` batches of ``cfg.local_batch`` rows for this rank and epoch."""
    parts = _checked([EpochPart(epoch, slices, steps)], cfg.local_batch, rank)
    blocks = _Reader(spec, seed, cfg, use_ray).blocks(parts)
    for _, batch in _mixed(blocks, spec, cfg, seed, rank):
        if batch is not None:
            yield batch


class RankFeed:
    """One rank's batches over consecutive epochs, from one pipeline of read tasks.

    ``epoch(e)`` gives exactly that epoch's batches of ``local_batch`` rows; call it for each
    planned epoch in turn. Every epoch has its own shuffle buffer and seeded order, so batches
    are a pure function of (seed, epoch, rank): only the timing crosses epochs.
    """

    def __init__(
        self,
        parts: Iterable[EpochPart],
        spec: DecodeSpec,
        cfg: FeedConfig,
        seed: int,
        rank: int,
        use_ray: bool = True,
    ) -> None:
        self._stop = threading.Event()
        self.reader = _Reader(spec, seed, cfg, use_ray)
        blocks = self.reader.blocks(_checked(parts, cfg.local_batch, rank))
        self._items = prefetched(
            _mixed(blocks, spec, cfg, seed, rank), cfg.prefetch_batches, self._stop
        )

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This epoch's batches; the reads of the next are under way before its end."""
        for e, batch in self._items:
            if e < epoch and batch is None:  # the end of an epoch whose last batch was taken
                continue  # by a consumer that stopped at its step count without asking again
            if e != epoch:
                raise SeppError(f"the feed's next epoch is {e}, not {epoch}: read them in order")
            if batch is None:
                return
            yield batch
        raise SeppError(f"epoch {epoch} is past the feed's last planned epoch")

    def close(self) -> None:
        """Stop reading ahead (a run that ends before its planned last epoch)."""
        self._stop.set()


def prefetched(items: Iterator[T], depth: int, stop: threading.Event | None = None) -> Iterator[T]:
    """Run ``items`` in a background thread, ``depth`` ahead (errors re-raised here); setting
    ``stop`` ends the thread."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()
    halt = stop or threading.Event()

    def put(x: Any) -> bool:
        while not halt.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer
            put(e)

    t = threading.Thread(target=work, daemon=True, name="sepp-feed")
    t.start()
    while True:
        item = q.get()
        if item is done:
            break
        if isinstance(item, BaseException):
            raise item
        yield item
    t.join()
