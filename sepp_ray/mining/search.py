"""Semantic-pair search: for each anchor, the keys whose cosine similarity lies in [lo, hi].

SePP (arXiv 2306.16122) takes as extra positives pairs of *different* images whose pre-trained
embeddings are very similar but not identical (0.96 <= cos <= 0.99 in the paper). Semantics,
shared by every backend and defined by the numpy reference (`search_numpy`):

- a key is a candidate for an anchor when lo <= sim <= hi (both inclusive, thresholds rounded to
  float32 and compared in float32), its id differs from the anchor's, and it is not an exact
  duplicate (sim >= 1 - dup_eps is excluded even when hi = 1);
- each anchor keeps at most m candidates, most similar first, ties broken by smaller key id;
- output rows are ordered by (anchor position in the input, rank), rank starting at 1.

Similarities are float32 dot products (fp16 inputs with fp32 accumulation and output on CUDA),
never bf16: its spacing near 1.0 (2^-8) is coarser than the gap between the thresholds.

Backends sit in a registry; `build_searcher(keys)` prepares keys once (device upload, faiss
index) so a long-lived worker can answer many query batches; `search(...)` is the one-shot form.
Pure: no Ray here. For sharded keys, search each shard and `merge_shard_results`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
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
    query_ids: np.ndarray, qpos: np.ndarray, sims: np.ndarray, key_ids: np.ndarray, m: int
) -> Pairs:
    """Exact per-anchor top m by (sim desc, key id asc) among candidates; -inf marks none.

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
    keep = rank <= m
    return Pairs(query_ids[qpos[keep]], key_ids[keep], sims[keep], rank[keep])


def merge_shard_results(results: list[Pairs], m: int, query_ids: np.ndarray | None = None) -> Pairs:
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


def _check_m(m: int) -> None:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise SeppError(f"m={m!r} must be a positive int: the number of positives per anchor")


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
        m: int = 1,
        dup_eps: float = DEFAULT_DUP_EPS,
        validate: bool = True,
    ) -> Pairs:
        """Pairs for `queries` (anchors) against the prepared keys; see the module doc."""
        win = Window.make(lo, hi, dup_eps)
        _check_m(m)
        if validate:
            queries = validate_vectors(queries, "query")
        if queries.dim != self.keys.dim:
            raise SeppError(
                f"query dim {queries.dim} != key dim {self.keys.dim}: embed both with one encoder"
            )
        self_pos = _positions(queries.ids, self.keys.ids, self._sorter)
        return self._search(queries, self_pos, win, m)

    @abstractmethod
    def _search(self, q: Vectors, self_pos: np.ndarray, win: Window, m: int) -> Pairs: ...


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
    m: int = 1,
    backend: str = "auto",
    *,
    dup_eps: float = DEFAULT_DUP_EPS,
    **options: Any,
) -> Pairs:
    """One-shot search: prepare `keys` with `backend`, then search `queries` against them."""
    return build_searcher(keys, backend, **options).search(queries, lo, hi, m, dup_eps)


def search_numpy(
    queries: Vectors, keys: Vectors, lo: float = 0.96, hi: float = 0.99, m: int = 1, **kw: Any
) -> Pairs:
    """The reference every backend must match."""
    return search(queries, keys, lo, hi, m, backend="numpy", **kw)


@register_backend("numpy")
class NumpySearcher(KeySearcher):
    """Brute force, float32 BLAS, chunked over queries so one chunk's sims fit `chunk_bytes`."""

    def __init__(self, keys: Vectors, chunk_bytes: int = 256 << 20, validate: bool = True) -> None:
        super().__init__(keys, validate)
        self.chunk_bytes = chunk_bytes

    def _search(self, q: Vectors, self_pos: np.ndarray, win: Window, m: int) -> Pairs:
        keys, qv = self.keys.numpy(), q.numpy()
        n = keys.shape[0]
        rows = max(1, self.chunk_bytes // (4 * n))
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for s in range(0, qv.shape[0], rows):
            sims = qv[s : s + rows] @ keys.T  # [r, N] float32
            valid = (sims >= np.float32(win.lo)) & (sims <= np.float32(win.upper))
            sp = self_pos[s : s + rows]
            valid[np.flatnonzero(sp >= 0), sp[sp >= 0]] = False
            if n > m:  # keep each row's m best (and anything tied with the m-th)
                masked = np.where(valid, sims, np.float32(-np.inf))
                kth = np.partition(masked, n - m, axis=1)[:, n - m]  # [r] m-th largest
                valid &= masked >= kth[:, None]
            r, c = np.nonzero(valid)
            out.append((r + s, sims[r, c], c))
        qpos, sims, cols = _columns(out)
        return select_top(q.ids, qpos, sims, self.keys.ids[cols], m)


@contextlib.contextmanager
def _exact_matmul(device: torch.device) -> Iterator[None]:
    """Force fp32 accumulation and forbid the bf16 path of fp32 matmuls on CUDA."""
    if device.type != "cuda":
        yield
        return
    cfg = torch.backends.cuda.matmul
    old_reduce, old_prec = cfg.allow_fp16_reduced_precision_reduction, None
    cfg.allow_fp16_reduced_precision_reduction = False
    if torch.get_float32_matmul_precision() == "medium":  # "medium" may compute in bf16
        old_prec = "medium"
        torch.set_float32_matmul_precision("high")  # tf32: 10-bit mantissa like fp16
    try:
        yield
    finally:
        cfg.allow_fp16_reduced_precision_reduction = old_reduce
        if old_prec is not None:
            torch.set_float32_matmul_precision(old_prec)


_FP16_TO_FP32_MM = [True]  # flips off once if this torch build lacks mm(..., out_dtype)


def similarity_block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [r, D] @ b [c, D]^T -> [r, c] float32; fp16 inputs accumulate and return in fp32."""
    if a.dtype not in ALLOWED_DTYPES or b.dtype != a.dtype:  # never bf16
        raise AssertionError(f"similarity inputs must be fp16 or fp32, got {a.dtype}, {b.dtype}")
    if a.dtype == torch.float16:
        if a.device.type == "cuda" and _FP16_TO_FP32_MM[0]:
            try:
                sims = torch.mm(a, b.T, out_dtype=torch.float32)
            except (RuntimeError, TypeError) as err:  # torch without fp16 -> fp32 GEMM
                warnings.warn(f"no fp16 GEMM with fp32 output ({err}); using fp32", stacklevel=2)
                _FP16_TO_FP32_MM[0] = False
                return similarity_block(a, b)
        else:  # same rounded inputs, fp32 arithmetic (CPU has no fp16 -> fp32 GEMM)
            sims = torch.mm(a.float(), b.float().T)
    else:
        sims = torch.mm(a, b.T)
    if sims.dtype != torch.float32:
        raise AssertionError(f"similarities must be float32, got {sims.dtype}")
    return sims


def _to_device(x: Any, device: torch.device, dtype: torch.dtype, rows: int = 65536) -> torch.Tensor:
    """Copy [N, D] rows to `device` in `dtype` chunk by chunk (no full fp32 copy on the GPU)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.device == device and t.dtype == dtype:
        return t
    out = torch.empty(t.shape, dtype=dtype, device=device)
    for s in range(0, t.shape[0], rows):
        out[s : s + rows] = t[s : s + rows].to(device).to(dtype)
    return out


def _block_top(
    sims: torch.Tensor, self_col: torch.Tensor, win: Window, m: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Top m in-range entries of one [r, c] similarity block (modified in place).

    Keys above the window (near-duplicates) and the anchor itself become -inf *before* topk so
    they cannot crowd out in-range keys; keys below lo need no pass, they lose to any in-range
    key. Rows whose m-th value is tied with an unpicked entry (topk's m+1-th equals it) return
    every entry >= it instead, as extras, so ties resolve by id later. No host sync but one.
    """
    c = sims.shape[1]
    inside = ((self_col >= 0) & (self_col < c)).unsqueeze(1)  # [r, 1] anchor is in this block
    col = self_col.clamp(0, c - 1).unsqueeze(1)  # [r, 1]
    sims.masked_fill_(sims > win.upper, -math.inf)
    sims.scatter_(1, col, torch.where(inside, -math.inf, sims.gather(1, col)))
    vals, idx = sims.topk(min(m + 1, c), dim=1)  # [r, <= m+1] descending
    vals.masked_fill_(vals < win.lo, -math.inf)
    if vals.shape[1] <= m:  # the block holds at most m keys: all are candidates
        return vals, idx, None
    t = vals[:, m - 1].clone()  # [r] m-th value
    tie = (vals[:, m] == t) & torch.isfinite(t)  # [r]
    vals, idx = vals[:, :m], idx[:, :m]
    if not bool(tie.any()):
        return vals, idx, None
    tr = torch.nonzero(tie).squeeze(1)
    vals[tr] = -math.inf
    rr, cc = torch.nonzero(sims[tr] >= t[tr].unsqueeze(1)).unbind(1)
    return vals, idx, (tr[rr], sims[tr[rr], cc], cc)


@register_backend("torch")
class TorchSearcher(KeySearcher):
    """Exact matmul + topk, chunked over queries and keys; fp16 x fp16 -> fp32 on CUDA.

    Keys stay on the device between searches when they fit `resident_bytes` (default: half of
    the free device memory), else they are streamed block by block once per search.
    """

    def __init__(
        self,
        keys: Vectors,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        query_chunk: int | None = None,
        key_chunk: int | None = None,
        resident_bytes: int | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__(keys, validate)
        if device is None:
            on = keys.vecs.device if isinstance(keys.vecs, torch.Tensor) else None
            device = on or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.float16 if cuda else torch.float32)
        if self.dtype not in ALLOWED_DTYPES:
            raise SeppError(
                f"dtype {self.dtype} is refused: bf16 spacing near 1.0 (2^-8) is coarser than "
                "the thresholds; use torch.float16 or torch.float32"
            )
        self.query_chunk = query_chunk or (8192 if cuda else 1024)
        block_bytes = (1 << 30) if cuda else (64 << 20)  # one fp32 similarity block
        self.key_chunk = key_chunk or max(1, block_bytes // (4 * self.query_chunk))
        if resident_bytes is None:
            resident_bytes = torch.cuda.mem_get_info(self.device)[0] // 2 if cuda else 1 << 62
        nbytes = len(keys) * keys.dim * (2 if self.dtype == torch.float16 else 4)
        self._resident = (
            _to_device(keys.vecs, self.device, self.dtype) if nbytes <= resident_bytes else None
        )

    def _key_block(self, s: int, e: int) -> torch.Tensor:
        if self._resident is not None:
            return self._resident[s:e]
        return _to_device(self.keys.vecs[s:e], self.device, self.dtype)

    def _search(self, q: Vectors, self_pos: np.ndarray, win: Window, m: int) -> Pairs:
        dev, n, nq = self.device, len(self.keys), len(q)
        qv = _to_device(q.vecs, dev, self.dtype)  # [Q, D]
        qself = torch.from_numpy(self_pos).to(dev)  # [Q] key position of the anchor, -1 none
        starts = list(range(0, n, self.key_chunk))
        cand_v = torch.full((nq, len(starts) * m), -math.inf, device=dev)  # [Q, blocks*m]
        cand_i = torch.zeros((nq, len(starts) * m), dtype=torch.int64, device=dev)
        extras: list[tuple[torch.Tensor, ...]] = []
        with _exact_matmul(dev), torch.inference_mode():
            for b, s in enumerate(starts):
                kb = self._key_block(s, s + self.key_chunk)  # [c, D]
                for r in range(0, nq, self.query_chunk):
                    rq = slice(r, r + self.query_chunk)
                    sims = similarity_block(qv[rq], kb)  # [r, c] fp32
                    vals, idx, ex = _block_top(sims, qself[rq] - s, win, m)
                    cols = slice(b * m, b * m + vals.shape[1])
                    cand_v[rq, cols], cand_i[rq, cols] = vals, idx + s
                    if ex is not None:
                        extras.append((ex[0] + r, ex[1], ex[2] + s))
        rows, slots = torch.nonzero(torch.isfinite(cand_v)).unbind(1)  # only in-range survive
        found = (rows, cand_v[rows, slots], cand_i[rows, slots])
        parts = [tuple(t.cpu().numpy() for t in tup) for tup in [found, *extras]]
        qpos, sim, key_pos = _columns(parts)
        return select_top(q.ids, qpos, sim, self.keys.ids[key_pos], m)


class _FaissSearcher(KeySearcher):
    """Shared loop for faiss indexes, which return plain top k: k doubles per anchor until it
    holds m in-range keys strictly above its k-th similarity, or the k-th is below lo."""

    GPU_MAX_K = 2048  # faiss GPU selection limit; past it, the CPU index finishes the anchors
    result_budget = 1 << 24  # result entries (rows x k) per faiss call

    def __init__(self, keys: Vectors, gpu: bool | None = None, validate: bool = True) -> None:
        import faiss

        super().__init__(keys, validate)
        self.cpu_index = self._build(np.ascontiguousarray(self.keys.numpy()))
        has_gpu = hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available()
        self.indexes: list[tuple[Any, int | None]] = [(self.cpu_index, None)]
        if has_gpu if gpu is None else gpu:
            self._res = faiss.StandardGpuResources()
            dev = torch.cuda.current_device()
            gpu_index = faiss.index_cpu_to_gpu(self._res, dev, self.cpu_index)
            self._configure(gpu_index)
            self.indexes.insert(0, (gpu_index, self.GPU_MAX_K))

    @abstractmethod
    def _build(self, x: np.ndarray) -> Any: ...

    def _configure(self, index: Any) -> None:
        """Per-index search settings (nprobe for IVF)."""

    def _search(self, q: Vectors, self_pos: np.ndarray, win: Window, m: int) -> Pairs:
        qv, n = np.ascontiguousarray(q.numpy()), len(self.keys)
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        pending, k, level = np.arange(len(q)), min(n, max(2 * m, m + 8)), 0
        while pending.size:
            index, cap = self.indexes[level]
            if cap is not None and k > cap:
                level += 1
                continue
            rows = max(1, self.result_budget // k)  # bounds the [rows, k] result arrays
            done = np.concatenate(
                [
                    self._round(index, qv, pending[s : s + rows], self_pos, k, win, m, out)
                    for s in range(0, pending.size, rows)
                ]
            )
            pending, k = pending[~done], min(n, 2 * k)
        if not out:
            return Pairs.empty()
        qpos, sims, cols = _columns(out)
        return select_top(q.ids, qpos, sims, self.keys.ids[cols], m)

    def _round(
        self,
        index: Any,
        qv: np.ndarray,
        rows: np.ndarray,
        self_pos: np.ndarray,
        k: int,
        win: Window,
        m: int,
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ) -> np.ndarray:
        """Search `rows` with k; append candidates of finished rows to `out`, return done."""
        sims, pos = index.search(qv[rows], k)  # [p, k] descending similarity
        valid = (pos >= 0) & (sims >= win.lo) & (sims <= win.upper)
        valid &= pos != self_pos[rows][:, None]
        mth = sims[np.arange(rows.size), np.argmax(valid.cumsum(1) >= m, axis=1)]  # [p]
        last = sims[:, -1]
        exhausted = (pos[:, -1] < 0) | (k >= len(self.keys))
        # complete once every key tied with or above the m-th in-range one was returned
        done = exhausted | (last < win.lo) | ((valid.sum(1) >= m) & (mth > last))
        r, c = np.nonzero(valid & done[:, None])
        out.append((rows[r], sims[r, c], pos[r, c]))
        return done


@register_backend("faiss-flat")
class FaissFlatSearcher(_FaissSearcher):
    """Exact inner-product index (IndexFlatIP), on the GPU when faiss was built with it."""

    def _build(self, x: np.ndarray) -> Any:
        import faiss

        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        return index


@register_backend("faiss-ivf")
class FaissIVFSearcher(_FaissSearcher):
    """Approximate IndexIVFFlat (inner product): nlist ~ 4 sqrt(N) k-means cells trained on a
    seeded sample, `nprobe` cells searched per query. Pairs are a subset of the exact ones.

    Worth it on CPU past `IVF_RECOMMENDED_N` keys: exact search grows as K x N = 5% N^2, IVF as
    N^1.5 (training and probing). benchmarks/mining.py, 2 CPU cores, D = 512, K = 5%, totals:
    faiss-flat 3.05 s vs IVF 4.38 s at N = 100k, 13.1 s vs 10.1 s at 200k (recall 1.000 on
    clustered data, nprobe 32); extrapolated to 1.28M: ~9 min vs ~3 min. On CUDA exact torch
    search stays seconds at 1.28M keys, so IVF is a CPU tool.
    """

    exact = False

    def __init__(
        self,
        keys: Vectors,
        nprobe: int = 32,
        nlist: int | None = None,
        seed: int = 0,
        gpu: bool | None = None,
        validate: bool = True,
    ) -> None:
        n = len(keys)
        self.nlist = nlist or int(min(max(1, round(4 * math.sqrt(n))), max(1, n // 39)))
        self.nprobe, self.seed = min(nprobe, self.nlist), seed
        super().__init__(keys, gpu, validate)

    def _build(self, x: np.ndarray) -> Any:
        import faiss

        self._quantizer = faiss.IndexFlatIP(x.shape[1])  # referenced by the index: keep alive
        index = faiss.IndexIVFFlat(
            self._quantizer, x.shape[1], self.nlist, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.seed = self.seed
        size = min(x.shape[0], 40 * self.nlist)  # faiss wants >= 39 points per cell
        sample = np.sort(np.random.default_rng(self.seed).choice(x.shape[0], size, replace=False))
        index.train(x[sample])
        index.add(x)
        self._configure(index)
        return index

    def _configure(self, index: Any) -> None:
        index.nprobe = self.nprobe
