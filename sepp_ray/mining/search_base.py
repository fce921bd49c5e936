"""What every pair-search backend shares: the semantics, the result type, the `KeySearcher` base,
the registry, and the numpy reference. For each anchor, the keys whose cosine similarity lies
in [lo, hi].

SePP (arXiv 2306.16122) takes as extra positives pairs of *different* images whose pre-trained
embeddings are very similar but not identical (0.96 <= cos <= 0.99 in the paper). Semantics,
shared by every backend and defined by the numpy reference (`NumpySearcher`, below):

- a key is a candidate for an anchor when lo <= sim <= hi (both inclusive, thresholds rounded to
  float32 and compared in float32), its id differs from the anchor's, and it is not an exact
  duplicate (sim >= 1 - dup_eps is excluded even when hi = 1);
- each anchor keeps every candidate (m = None, the paper's rule) or at most m of them, most
  similar first, ties broken by smaller key id;
- output rows are ordered by (anchor position in the input, rank), rank starting at 1;
- `limit` (None: off) bounds the output: a search that would return more pairs is a SeppError,
  raised while the search runs, so a window too wide for the encoder cannot exhaust memory.

Top-k machinery (torch blocks, faiss) cannot see past its k, so with m = None the torch backend
keeps every in-window entry of each similarity block and faiss doubles k until the k-th
similarity falls below lo: no in-window key is missed however many there are.

Similarities are float32 dot products (fp16 inputs with fp32 accumulation and output on CUDA),
never bf16: its spacing near 1.0 (2^-8) is coarser than the gap between the thresholds.

Backend modules (`search_torch`, `search_faiss`) import this one and register their class in
`SEARCH_BACKENDS`; `sepp_ray.mining.search` imports every backend and is the entry point
(`build_searcher`, `search`). Pure: no Ray here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from sepp_ray.errors import SeppError
from sepp_ray.mining.anchors import Vectors, validate_thresholds, validate_vectors
from sepp_ray.registry import Registry

DEFAULT_DUP_EPS = 1e-4
ALLOWED_DTYPES = (torch.float16, torch.float32)  # bf16 deliberately absent (see module doc)


@dataclass(frozen=True)
class Pairs:
    """Mined pairs as columns: anchor_id, positive_id (int64), similarity (f32), rank (i32)."""

    anchor_id: np.ndarray
    positive_id: np.ndarray
    similarity: np.ndarray
    rank: np.ndarray

    def __post_init__(self) -> None:
        for name, dtype in (
            ("anchor_id", np.int64),
            ("positive_id", np.int64),
            ("similarity", np.float32),
            ("rank", np.int32),
        ):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))

    def __len__(self) -> int:
        return int(self.anchor_id.shape[0])

    @staticmethod
    def empty() -> Pairs:
        return Pairs(np.empty(0), np.empty(0), np.empty(0), np.empty(0))

    @staticmethod
    def concat(parts: list[Pairs]) -> Pairs:
        """Join results of disjoint query shards (order of `parts` is kept)."""
        if not parts:
            return Pairs.empty()
        cols = ("anchor_id", "positive_id", "similarity", "rank")
        return Pairs(*(np.concatenate([getattr(p, c) for p in parts]) for c in cols))

    def to_dict(self) -> dict[str, np.ndarray]:
        """Column dict, e.g. for `pyarrow.table`."""
        return {
            "anchor_id": self.anchor_id,
            "positive_id": self.positive_id,
            "similarity": self.similarity,
            "rank": self.rank,
        }


@dataclass(frozen=True)
class Window:
    """The accepted similarity interval, both ends float32-exact and inclusive."""

    lo: float
    upper: float  # min(hi, largest float32 below 1 - dup_eps)

    @staticmethod
    def make(lo: float, hi: float, dup_eps: float) -> Window:
        lo, hi = validate_thresholds(lo, hi)
        if not (isinstance(dup_eps, (int, float, np.floating)) and 0.0 <= dup_eps < 1.0):
            raise SeppError(f"dup_eps={dup_eps!r} must lie in [0, 1); the default is 1e-4")
        dup = np.float32(1.0 - dup_eps)
        below_dup = np.nextafter(dup, np.float32(-np.inf))  # sim < dup  <=>  sim <= below_dup
        return Window(float(np.float32(lo)), float(min(np.float32(hi), below_dup)))


def select_top(
    query_ids: np.ndarray, qpos: np.ndarray, sims: np.ndarray, key_ids: np.ndarray, m: int | None
) -> Pairs:
    """Exact per-anchor top m (all when m is None) by (sim desc, key id asc); -inf marks none.

    Backends only need to hand in a superset of each anchor's true top m (ties included).
    """
    keep = np.isfinite(sims)
    qpos, sims, key_ids = qpos[keep], sims[keep].astype(np.float32), key_ids[keep]
    order = np.lexsort((key_ids, -sims, qpos))
    qpos, sims, key_ids = qpos[order], sims[order], key_ids[order]
    n = qpos.shape[0]
    first = np.ones(n, dtype=bool)
    first[1:] = qpos[1:] != qpos[:-1]
    starts = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    rank = np.arange(n) - starts + 1
    keep = rank <= m if m is not None else np.ones(n, dtype=bool)
    return Pairs(query_ids[qpos[keep]], key_ids[keep], sims[keep], rank[keep])


def id_positions(
    ids: np.ndarray, table: np.ndarray, sorter: np.ndarray | None = None
) -> np.ndarray:
    """Index of each id in `table`, -1 where absent (used for self-pairs and merges)."""
    sorter = np.argsort(table, kind="stable") if sorter is None else sorter
    sorted_table = table[sorter]
    at = np.clip(np.searchsorted(sorted_table, ids), 0, max(len(table) - 1, 0))
    found = sorted_table[at] == ids if len(table) else np.zeros(len(ids), dtype=bool)
    return np.where(found, sorter[at], -1).astype(np.int64)


def concat_columns(parts: Sequence[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Concatenate candidate tuples (qpos, sims, key positions) column-wise."""
    return tuple(np.concatenate(col) for col in zip(*parts, strict=True))


def check_m(m: int | None) -> None:
    if m is None:
        return
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise SeppError(
            f"m={m!r} must be a positive int (the most positives per anchor) or None (all)"
        )


def check_limit(count: int, limit: int | None) -> None:
    """Refuse a search whose output passed ``limit`` pairs (None: no limit)."""
    if limit is not None and count > limit:
        raise SeppError(
            f"the search returns more than {limit} pairs ({count} so far): the window [lo, hi] "
            "is too wide for this encoder. Raise lo, lower K, cap positives per anchor with m, "
            "or raise max_pairs"
        )


class KeySearcher(ABC):
    """Keys prepared once for many query batches (what one Ray actor would hold)."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True

    def __init__(self, keys: Vectors, validate: bool = True) -> None:
        self.keys = validate_vectors(keys, "key") if validate else keys
        self._sorter = np.argsort(self.keys.ids, kind="stable")

    def search(
        self,
        queries: Vectors,
        lo: float,
        hi: float,
        m: int | None = None,
        dup_eps: float = DEFAULT_DUP_EPS,
        validate: bool = True,
        limit: int | None = None,
    ) -> Pairs:
        """Pairs for `queries` (anchors) against the prepared keys; see the module doc."""
        win = Window.make(lo, hi, dup_eps)
        check_m(m)
        if limit is not None and (isinstance(limit, bool) or limit < 0):
            raise SeppError(f"limit={limit!r} must be a count >= 0 or None (no limit)")
        if validate:
            queries = validate_vectors(queries, "query")
        if queries.dim != self.keys.dim:
            raise SeppError(
                f"query dim {queries.dim} != key dim {self.keys.dim}: embed both with one encoder"
            )
        self_pos = id_positions(queries.ids, self.keys.ids, self._sorter)
        pairs = self._search(queries, self_pos, win, m, limit)
        check_limit(len(pairs), limit)
        return pairs

    @abstractmethod
    def _search(
        self, q: Vectors, self_pos: np.ndarray, win: Window, m: int | None, limit: int | None
    ) -> Pairs:
        """Candidates per anchor (all, or a superset of the top m); calls `check_limit` on the
        running count so an oversized output fails before it is held in full."""


def _named_backend(name: str, cls: type[KeySearcher]) -> None:
    """A registered backend class knows its name (the mining manifest records it)."""
    if not (isinstance(cls, type) and issubclass(cls, KeySearcher)):
        raise TypeError(f"search backend {name!r} must be a KeySearcher subclass, got {cls!r}")
    cls.name = name


# Backends by name. Each backend module registers its class on import; `sepp_ray.mining.search`
# imports them all, so read the registry through it.
SEARCH_BACKENDS: Registry[type[KeySearcher]] = Registry("search backend", on_add=_named_backend)


@SEARCH_BACKENDS.register("numpy")
class NumpySearcher(KeySearcher):
    """Brute force, float32 BLAS, chunked over queries so one chunk's sims fit `chunk_bytes`."""

    def __init__(self, keys: Vectors, chunk_bytes: int = 256 << 20, validate: bool = True) -> None:
        super().__init__(keys, validate)
        self.chunk_bytes = chunk_bytes

    def _search(
        self, q: Vectors, self_pos: np.ndarray, win: Window, m: int | None, limit: int | None
    ) -> Pairs:
        keys, qv = self.keys.numpy(), q.numpy()
        n = keys.shape[0]
        rows = max(1, self.chunk_bytes // (4 * n))
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        found = 0
        for s in range(0, qv.shape[0], rows):
            sims = qv[s : s + rows] @ keys.T  # [r, N] float32
            valid = (sims >= np.float32(win.lo)) & (sims <= np.float32(win.upper))
            sp = self_pos[s : s + rows]
            valid[np.flatnonzero(sp >= 0), sp[sp >= 0]] = False
            if m is not None and n > m:  # keep each row's m best (and ties with the m-th)
                masked = np.where(valid, sims, np.float32(-np.inf))
                kth = np.partition(masked, n - m, axis=1)[:, n - m]  # [r] m-th largest
                valid &= masked >= kth[:, None]
            r, c = np.nonzero(valid)
            out.append((r + s, sims[r, c], c))
            per_row = valid.sum(1)  # [r] candidates per anchor, ties with the m-th included
            found += int(per_row.sum() if m is None else np.minimum(per_row, m).sum())
            check_limit(found, limit)
        qpos, sims, cols = concat_columns(out)
        return select_top(q.ids, qpos, sims, self.keys.ids[cols], m)
