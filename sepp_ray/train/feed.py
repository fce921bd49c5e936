"""Feeding one rank: read its slices in parallel CPU tasks, decode, mix, cut into batches.

Each slice (a part of one row group, `sepp_ray.train.plan`) is read and decoded by a Ray task
scheduled on the rank's node, several ahead of the trainer; results arrive in plan order and go
through a seeded shuffle buffer, so for a given (seed, epoch, rank) the batches are the same on
every run. Rows of one multi-positive group (an anchor and its positives, stored together in the
pair-item table) move through the buffer as one unit, so they land in the same batch.

Decoding itself is `sepp_ray.train.decode`.
"""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem
from sepp_ray.train.census import row_filter
from sepp_ray.train.decode import Batch, CropSpec, DecodeSpec, decode_on_device, decode_rows

__all__ = ["Batch", "CropSpec", "DecodeSpec", "decode_on_device", "decode_rows"]
from sepp_ray.train.plan import Slice


def read_slice(part: Slice, spec: DecodeSpec, seed: int, epoch: int) -> Batch:
    """Read one slice's rows (its row group, filtered as the census counted) and decode them,
    with crops drawn from a generator seeded by (seed, epoch, file, row group, start)."""
    exclude = spec.exclude
    if exclude is not None and not isinstance(exclude, np.ndarray):
        import ray

        exclude = ray.get(exclude)
    c = part.chunk
    fs, path = filesystem(c.uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        wanted = [x for x in pf.schema_arrow.names if x not in ("key",)]
        table = pf.read_row_group(c.row_group, columns=wanted)
    if c.table == "images":
        table = table.filter(pa.array(row_filter(table, spec.split, exclude)))
    # a fresh order inside the row group every epoch, the same for every rank (so ranks that
    # share a row group take disjoint rows), groups kept together
    key = [seed, epoch, zlib.crc32(c.uri.encode()), c.row_group]
    group = (
        table["group"].to_numpy() if "group" in table.column_names else np.full(table.num_rows, -1)
    )
    table = table.take(pa.array(unit_order(group, np.random.default_rng([*key, 1]))))
    if table.num_rows != c.rows:
        raise SeppError(
            f"{c.uri} row group {c.row_group} holds {table.num_rows} training rows, the plan "
            f"counted {c.rows}: the data changed under a running job"
        )
    table = table.slice(part.start, part.rows)
    rng = np.random.default_rng([*key, 2, part.start])
    return decode_rows(table, spec, rng)


def concat(batches: list[Batch]) -> Batch:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def take(batch: Batch, index: np.ndarray) -> Batch:
    return {k: v[index] for k, v in batch.items()}


def units_of(group: np.ndarray) -> list[np.ndarray]:
    """Row indices of each unit: a run of rows of one group (group >= 0), or a single row."""
    n = len(group)
    if n == 0:
        return []
    starts = np.ones(n, bool)
    starts[1:] = (group[1:] != group[:-1]) | (group[1:] < 0)
    return np.split(np.arange(n), np.flatnonzero(starts)[1:])


def unit_order(group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random row order that keeps each run of rows of one group (group >= 0) together."""
    units = units_of(group)
    if not units:
        return np.zeros(0, np.int64)
    return np.concatenate([units[i] for i in rng.permutation(len(units))])


def pack(units: list[np.ndarray], batch: int, n_batches: int) -> tuple[list[np.ndarray], list[int]]:
    """Cut ``n_batches`` batches of exactly ``batch`` rows from units in their given order,
    never splitting a group while single rows can fill the gap (a group split over two batches
    loses the positives it was grouped for). Returns the batches and the unused units."""
    groups_ = [i for i, u in enumerate(units) if len(u) > 1]
    singles = [i for i, u in enumerate(units) if len(u) == 1]
    gi = si = 0
    out: list[np.ndarray] = []
    spill: list[int] = []  # rows of a unit split by the fallback, first in the next batch
    for _ in range(n_batches):
        parts: list[int] = spill[:batch]
        spill = spill[batch:]
        while len(parts) < batch and gi < len(groups_):
            u = units[groups_[gi]]
            if len(parts) + len(u) > batch and si < len(singles):
                break
            take = batch - len(parts)
            parts.extend(u[:take].tolist())
            spill.extend(u[take:].tolist())
            gi += 1
        while len(parts) < batch and si < len(singles):
            parts.append(int(units[singles[si]][0]))
            si += 1
        while len(parts) < batch and gi < len(groups_):  # no singles left: split a group
            u = units[groups_[gi]]
            take = batch - len(parts)
            parts.extend(u[:take].tolist())
            spill.extend(u[take:].tolist())
            gi += 1
        out.append(np.asarray(parts, np.int64))
    rest = spill + [r for i in groups_[gi:] for r in units[i].tolist()]
    rest += [int(units[i][0]) for i in singles[si:]]
    return out, rest


class ShuffleBuffer:
    """Seeded mixing of a stream of row blocks into fixed-size batches.

    Blocks are pooled until ``capacity`` rows; the pool's units are then put in a random order
    and packed into batches (`pack`), half the pool staying to mix with what comes next.
    """

    def __init__(self, batch: int, capacity: int, rng: np.random.Generator) -> None:
        self.batch = batch
        self.capacity = max(capacity, batch)
        self.rng = rng
        self.pool: list[Batch] = []
        self.rows = 0

    def _mix(self, final: bool) -> Iterator[Batch]:
        merged = concat(self.pool)
        units = units_of(merged["group"])
        units = [units[i] for i in self.rng.permutation(len(units))]
        keep = 0 if final else self.capacity // 2
        n_out = (self.rows - keep) // self.batch
        batches, rest = pack(units, self.batch, n_out)
        for idx in batches:
            yield take(merged, idx)
        self.pool = [take(merged, np.asarray(rest, np.int64))] if rest else []
        self.rows = len(rest)

    def push(self, block: Batch) -> Iterator[Batch]:
        if len(block["id"]):
            self.pool.append(block)
            self.rows += len(block["id"])
        if self.rows >= self.capacity + self.batch:
            yield from self._mix(final=False)

    def flush(self) -> Iterator[Batch]:
        if self.rows:
            yield from self._mix(final=True)


@dataclass(frozen=True)
class FeedConfig:
    """How a rank is fed: batch size, buffer, how far reading runs ahead."""

    local_batch: int
    buffer_rows: int = 4096  # shuffle buffer (rows); capped by buffer_bytes
    buffer_bytes: int = 512 * 2**20
    read_ahead: int = 8  # slices being read and decoded at once (Ray tasks)
    prefetch_batches: int = 2  # batches assembled ahead of the trainer (a thread)
    task_cpus: float = 1.0


def _remote_reader(cpus: float) -> Any:
    import ray

    return ray.remote(num_cpus=cpus)(read_slice)


def _buffer_rows(cfg: FeedConfig, spec: DecodeSpec) -> int:
    side = max(spec.size, spec.view1.size if spec.view1 else 0)
    per_row = 2 * side * side * 3 + spec.n_local * (spec.local.size if spec.local else 0) ** 2 * 3
    return max(cfg.local_batch, min(cfg.buffer_rows, cfg.buffer_bytes // max(per_row, 1)))


def iter_slices(
    slices: list[Slice], spec: DecodeSpec, seed: int, epoch: int, cfg: FeedConfig, use_ray: bool
) -> Iterator[Batch]:
    """Decoded slices in plan order; with Ray, ``read_ahead`` tasks run ahead on this node."""
    if not use_ray:
        for s in slices:
            yield read_slice(s, spec, seed, epoch)
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    task = _remote_reader(cfg.task_cpus).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)
    )
    pending: list[Any] = []
    it = iter(slices)
    for s in it:
        pending.append(task.remote(s, spec, seed, epoch))
        if len(pending) >= cfg.read_ahead:
            break
    while pending:
        ref = pending.pop(0)
        nxt = next(it, None)
        if nxt is not None:
            pending.append(task.remote(nxt, spec, seed, epoch))
        yield ray.get(ref)


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
    want = steps * cfg.local_batch
    have = sum(s.rows for s in slices)
    if have != want:
        raise SeppError(f"rank {rank} was planned {have} rows for {steps} steps of {want}")
    buf = ShuffleBuffer(
        cfg.local_batch, _buffer_rows(cfg, spec), np.random.default_rng([seed, epoch, rank, 7])
    )
    for block in iter_slices(slices, spec, seed, epoch, cfg, use_ray):
        yield from buf.push(block)
    yield from buf.flush()


def prefetched(batches: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run ``batches`` in a background thread, ``depth`` ahead (errors re-raised here)."""
    if depth <= 0:
        yield from batches
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for b in batches:
                q.put(b)
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

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
