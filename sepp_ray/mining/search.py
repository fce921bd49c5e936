"""Semantic-pair search: for each anchor, the keys whose cosine similarity lies in [lo, hi].

SePP (arXiv 2306.16122) takes as extra positives pairs of *different* images whose pre-trained
embeddings are very similar but not identical (0.96 <= cos <= 0.99 in the paper). Semantics,
shared by every backend and defined by the numpy reference (`search_numpy`):

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

Backends sit in a registry; `build_searcher(keys)` prepares keys once (device upload, faiss
index) so a long-lived worker can answer many query batches; `search(...)` is the one-shot form.
Pure: no Ray here. For sharded keys, search each shard and `merge_shard_results`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from sepp_ray.errors import SeppError
from sepp_ray.mining.anchors import Vectors, validate_thresholds, validate_vectors

DEFAULT_DUP_EPS = 1e-4
IVF_RECOMMENDED_N = 150_000  # CPU key count past which faiss-ivf beats exact search (see below)
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


def merge_shard_results(
    results: list[Pairs], m: int | None, query_ids: np.ndarray | None = None
) -> Pairs:
    """Merge searches of disjoint key shards run with the same anchors: equals one search of
    the union (each shard keeps its own top m, so the global top m is among them).

    Anchors come out in `query_ids` order when given, else by ascending id (the order of
    `choose_anchors`).
    """
    _check_m(m)
    allp = Pairs.concat(results)
    pair_keys = np.stack([allp.anchor_id, allp.positive_id], axis=1)  # [P, 2]
    if np.unique(pair_keys, axis=0).shape[0] != len(allp):
        raise SeppError("shard results repeat a pair: the key shards overlap; make them disjoint")
    order_ids = np.unique(allp.anchor_id) if query_ids is None else np.asarray(query_ids)
    qpos = _positions(allp.anchor_id, order_ids)
    if (qpos < 0).any():
        raise SeppError("shard results name anchors missing from query_ids: pass all anchor ids")
    return select_top(order_ids, qpos, allp.similarity, allp.positive_id, m)


def similarity_histogram(
    sims: np.ndarray, bins: int | np.ndarray = 20, lo: float = -1.0, hi: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Counts and bin edges of similarities over [lo, hi], for the pairs manifest."""
    counts, edges = np.histogram(np.asarray(sims, dtype=np.float64), bins=bins, range=(lo, hi))
    return counts.astype(np.int64), edges


def _positions(ids: np.ndarray, table: np.ndarray, sorter: np.ndarray | None = None) -> np.ndarray:
    """Index of each id in `table`, -1 where absent (used for self-pairs and merges)."""
    sorter = np.argsort(table, kind="stable") if sorter is None else sorter
    sorted_table = table[sorter]
    at = np.clip(np.searchsorted(sorted_table, ids), 0, max(len(table) - 1, 0))
    found = sorted_table[at] == ids if len(table) else np.zeros(len(ids), dtype=bool)
    return np.where(found, sorter[at], -1).astype(np.int64)


def _columns(parts: Sequence[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Concatenate candidate tuples (qpos, sims, key positions) column-wise."""
    return tuple(np.concatenate(col) for col in zip(*parts, strict=True))


def _check_m(m: int | None) -> None:
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
        _check_m(m)
        if limit is not None and (isinstance(limit, bool) or limit < 0):
            raise SeppError(f"limit={limit!r} must be a count >= 0 or None (no limit)")
        if validate:
            queries = validate_vectors(queries, "query")
        if queries.dim != self.keys.dim:
            raise SeppError(
                f"query dim {queries.dim} != key dim {self.keys.dim}: embed both with one encoder"
            )
        self_pos = _positions(queries.ids, self.keys.ids, self._sorter)
        pairs = self._search(queries, self_pos, win, m, limit)
        check_limit(len(pairs), limit)
        return pairs

    @abstractmethod
    def _search(
        self, q: Vectors, self_pos: np.ndarray, win: Window, m: int | None, limit: int | None
    ) -> Pairs:
        """Candidates per anchor (all, or a superset of the top m); calls `check_limit` on the
        running count so an oversized output fails before it is held in full."""


_BACKENDS: dict[str, type[KeySearcher]] = {}


def register_backend(name: str) -> Callable[[type[KeySearcher]], type[KeySearcher]]:
    """Class decorator adding a backend to the registry (tests iterate over it)."""

    def add(cls: type[KeySearcher]) -> type[KeySearcher]:
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return add


def available_backends(exact: bool | None = None) -> list[str]:
    """Registered backend names; `exact=True` keeps those that must equal the reference."""
    return sorted(n for n, c in _BACKENDS.items() if exact is None or c.exact == exact)


def auto_backend() -> str:
    """torch on CUDA, faiss-flat on CPU. benchmarks/mining.py on 2 CPU cores (D = 512, K = 5%):
    torch is faster up to N = 40k (0.69 s vs 0.89 s) but faiss-flat wins where mining matters,
    N >= 100k (3.05 s vs 3.92 s at 100k, 13.1 s vs 17.9 s at 200k)."""
    return "torch" if torch.cuda.is_available() else "faiss-flat"


def build_searcher(keys: Vectors, backend: str = "auto", **options: Any) -> KeySearcher:
    """Validate and prepare `keys` for repeated searches with one backend."""
    name = auto_backend() if backend == "auto" else backend
    if name not in _BACKENDS:
        raise SeppError(f"unknown search backend {backend!r}; choose from {available_backends()}")
    return _BACKENDS[name](keys, **options)


def search(
    queries: Vectors,
    keys: Vectors,
    lo: float = 0.96,
    hi: float = 0.99,
    m: int | None = None,
    backend: str = "auto",
    *,
    dup_eps: float = DEFAULT_DUP_EPS,
    limit: int | None = None,
    **options: Any,
) -> Pairs:
    """One-shot search: prepare `keys` with `backend`, then search `queries` against them."""
    searcher = build_searcher(keys, backend, **options)
    return searcher.search(queries, lo, hi, m, dup_eps, limit=limit)


def search_numpy(
    queries: Vectors,
    keys: Vectors,
    lo: float = 0.96,
    hi: float = 0.99,
    m: int | None = None,
    **kw: Any,
) -> Pairs:
    """The reference every backend must match."""
    return search(queries, keys, lo, hi, m, backend="numpy", **kw)


@register_backend("numpy")
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
        qpos, sims, cols = _columns(out)
        return select_top(q.ids, qpos, sims, self.keys.ids[cols], m)


# the torch and faiss backends register themselves on import; imported last, as they build on
# the above. similarity_block is re-exported: the similarity every exact backend agrees with.
from sepp_ray.mining import search_faiss  # noqa: E402, F401
from sepp_ray.mining.search_torch import similarity_block  # noqa: E402, F401
