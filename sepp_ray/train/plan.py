"""The epoch plan: which rows each rank reads, in which order, every epoch.

The unit of reading is a *chunk*: one Parquet row group of the image shards or of the run's
pair-item table (a few hundred rows; the images of a chunk are read together). Every epoch a
seeded permutation of all chunks is laid end to end and cut into one contiguous run of rows per
rank, ``steps x local_batch`` long; each rank then reads its run in parallel CPU tasks and mixes
it in a seeded shuffle buffer (``sepp_ray.train.feed``). So no rank owns a fixed slice, pair
items are spread over the epoch and over the ranks, two epochs differ, and the same (seed,
epoch) gives the same order on any restart. Pure functions: no Ray, no I/O.

Ingest writes shards in a seeded random order with rows shuffled inside them, so a chunk mixes
classes already; the permutation and the buffer mix the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sepp_ray.errors import SeppError


@dataclass(frozen=True)
class Chunk:
    """One row group: ``rows`` of its rows take part in training (split and exclusions applied)."""

    uri: str  # the Parquet file (a local path or an s3:// URI)
    row_group: int
    rows: int
    table: str  # "images" (the dataset's shards) or "items" (the run's pair-item table)


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of a chunk's used rows (after filtering), for one rank."""

    chunk: Chunk
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def total_rows(chunks: list[Chunk]) -> int:
    return int(sum(c.rows for c in chunks))


def epoch_order(chunks: list[Chunk], seed: int, epoch: int, pass_: int = 0) -> np.ndarray:
    """The seeded chunk order of one epoch (independent of the number of ranks).

    A stratified shuffle: each table's chunks (image shards, pair items) are permuted and then
    spread evenly over the epoch, each at a random point of its own equal share of it, so any
    stretch of the epoch, and so every rank's run of rows, holds its share of pair items even
    when they fill only a few row groups.
    """
    rng = np.random.default_rng([seed, epoch, 0x5E99] + ([pass_] if pass_ else []))
    keys = np.empty(len(chunks))
    tables = np.array([c.table for c in chunks])
    for name in sorted(set(tables.tolist())):
        idx = np.flatnonzero(tables == name)
        perm = rng.permutation(len(idx))
        keys[idx[perm]] = (np.arange(len(idx)) + rng.random(len(idx))) / len(idx)
    return np.argsort(keys, kind="stable")


def rank_slices(
    chunks: list[Chunk],
    seed: int,
    epoch: int,
    world: int,
    rank: int,
    rows_per_rank: int,
    cycle: bool = False,
) -> list[Slice]:
    """Rank ``rank``'s rows of epoch ``epoch``: rows [rank x R, (rank + 1) x R) of the epoch's
    permuted chunk sequence, R = ``rows_per_rank``. Rows past world x R are this epoch's
    leftovers (fewer than one global batch): a different set each epoch. ``cycle``: an epoch
    longer than the chunks (a re-mining round with fewer items than the plan's epoch) goes on
    through further seeded orders of them."""
    if not 0 <= rank < world:
        raise SeppError(f"rank {rank} outside a world of {world}")
    total = total_rows(chunks)
    if rows_per_rank * world > total and not cycle:
        raise SeppError(f"{world} ranks x {rows_per_rank} rows exceed the {total} training rows")
    passes = -(-rows_per_rank * world // max(1, total)) if cycle else 1
    order = np.concatenate(
        [epoch_order(chunks, seed, epoch, p) for p in range(max(1, passes))]
    ).astype(np.int64)
    lo, hi = rank * rows_per_rank, (rank + 1) * rows_per_rank
    out: list[Slice] = []
    pos = 0
    for i in order:
        c = chunks[int(i)]
        a, b = pos, pos + c.rows
        pos = b
        if b <= lo or c.rows == 0:
            continue
        if a >= hi:
            break
        out.append(Slice(c, max(lo, a) - a, min(hi, b) - a))
    return out
