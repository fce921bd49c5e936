"""Seeded mixing of decoded row blocks into fixed-size batches, with no per-row Python.

A *unit* is a run of rows of one multi-positive group (group >= 0; an anchor and its positives,
stored together) or a single row; units move whole, so a group lands in one batch. Units are
handled as (row indices laid end to end, unit lengths): every step is numpy index arithmetic,
whatever the number of rows. A row is copied twice between its decoded block and the batch the
trainer gets: into the buffer's preallocated slots, and out of them into the batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

Batch = dict[str, np.ndarray]
_EMPTY = np.zeros(0, np.int64)


def units_of(group: np.ndarray) -> np.ndarray:
    """Lengths of the units of rows 0..n-1 in order: runs of one group (>= 0), or single rows."""
    n = len(group)
    if n == 0:
        return _EMPTY
    starts = np.ones(n, bool)
    starts[1:] = (group[1:] != group[:-1]) | (group[1:] < 0)
    first = np.flatnonzero(starts)
    return np.diff(np.append(first, n)).astype(np.int64)


def ragged(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + l) for s, l in zip(starts, lens)])``, vectorised."""
    total = int(lens.sum())
    if total == 0:
        return _EMPTY
    offsets = np.cumsum(lens) - lens
    return np.repeat(np.asarray(starts, np.int64) - offsets, lens) + np.arange(total)


def permuted_units(lens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows 0..n-1 (units of lengths ``lens``) in a random unit order: (rows, lengths)."""
    perm = rng.permutation(len(lens))
    starts = np.cumsum(lens) - lens
    return ragged(starts[perm], lens[perm]), lens[perm]


def unit_order(group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random row order that keeps each run of rows of one group (group >= 0) together."""
    return permuted_units(units_of(group), rng)[0]


def pack_units(
    rows: np.ndarray, lens: np.ndarray, batch: int, n_batches: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Cut ``n_batches`` batches of exactly ``batch`` rows from units in their given order
    (``rows``: their rows end to end; ``lens``: their lengths), never splitting a group while
    single rows can fill the gap (a group split over two batches loses the positives it was
    grouped for). Returns the batches and the unused rows (a split group's rest first)."""
    ends = np.cumsum(lens)
    multi = lens > 1
    grouped = rows[ragged((ends - lens)[multi], lens[multi])]
    g_ends = np.cumsum(lens[multi])  # end of each group in `grouped`
    singles = rows[(ends - lens)[~multi]]
    gpos = si = 0
    spill = _EMPTY  # rows of a group split by the fallback, first in the next batch
    out: list[np.ndarray] = []
    for _ in range(n_batches):
        parts = [spill[:batch]]
        spill = spill[batch:]
        room = batch - len(parts[0])
        # whole groups while they fit; the first that does not waits (singles fill the gap)
        fit = int(np.searchsorted(g_ends, gpos + room, "right"))
        stop = int(g_ends[fit - 1]) if fit and g_ends[fit - 1] > gpos else gpos
        parts.append(grouped[gpos:stop])
        room -= stop - gpos
        gpos = stop
        n_single = min(room, len(singles) - si)
        parts.append(singles[si : si + n_single])
        si += n_single
        room -= n_single
        if room and gpos < len(grouped):  # no singles left: split a group
            cut = min(gpos + room, len(grouped))
            end = int(g_ends[np.searchsorted(g_ends, cut, "left")]) if cut < len(grouped) else cut
            parts.append(grouped[gpos:cut])
            spill = np.concatenate([spill, grouped[cut:end]])
            gpos = end
        out.append(np.concatenate(parts))
    return out, np.concatenate([spill, grouped[gpos:], singles[si:]])


def pack(
    units: list[np.ndarray], batch: int, n_batches: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """`pack_units` for units given as a list of row-index arrays."""
    lens = np.fromiter((len(u) for u in units), np.int64, len(units))
    rows = np.concatenate(units).astype(np.int64) if units else _EMPTY
    return pack_units(rows, lens, batch, n_batches)


class ShuffleBuffer:
    """Seeded mixing of a stream of row blocks into fixed-size batches.

    Rows are copied into preallocated slots until ``capacity`` rows wait; the pool's units are
    then put in a random order and packed into batches (`pack_units`), half the pool staying to mix
    with what comes next. ``push`` and ``flush`` are generators: consume one before the next.
    """

    def __init__(self, batch: int, capacity: int, rng: np.random.Generator) -> None:
        self.batch = batch
        self.capacity = max(capacity, batch)
        self.rng = rng
        self.store: Batch = {}  # row slots, one array per key
        self.free = _EMPTY  # free slots
        self.live = _EMPTY  # occupied slots, in pool order

    @property
    def rows(self) -> int:
        return len(self.live)

    def _grow(self, block: Batch, need: int) -> None:
        old = len(self.store["id"]) if self.store else 0
        size = old + max(need, old // 2, self.capacity + self.batch - old)
        grown = {k: np.empty((size, *v.shape[1:]), v.dtype) for k, v in block.items()}
        for k, v in self.store.items():
            grown[k][:old] = v
        self.store = grown
        self.free = np.concatenate([self.free, np.arange(old, size)])

    def _put(self, block: Batch) -> None:
        n = len(block["id"])
        if len(self.free) < n:
            self._grow(block, n - len(self.free))
        slots, self.free = self.free[:n], self.free[n:]
        for k, v in block.items():
            self.store[k][slots] = v
        self.live = np.concatenate([self.live, slots])

    def _mix(self, final: bool) -> Iterator[Batch]:
        rows, lens = permuted_units(units_of(self.store["group"][self.live]), self.rng)
        keep = 0 if final else self.capacity // 2
        batches, rest = pack_units(rows, lens, self.batch, (self.rows - keep) // self.batch)
        live, self.live = self.live, self.live[rest]
        taken = [live[b] for b in batches]
        for slots in taken:
            yield {k: v[slots] for k, v in self.store.items()}
        self.free = np.concatenate([self.free, *taken])

    def push(self, block: Batch) -> Iterator[Batch]:
        if len(block["id"]):
            self._put(block)
        if self.rows >= self.capacity + self.batch:
            yield from self._mix(final=False)

    def flush(self) -> Iterator[Batch]:
        if self.rows:
            yield from self._mix(final=True)
