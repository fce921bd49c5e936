"""Semantic-pair search, the entry point: `build_searcher(keys)` prepares keys once (device upload,
faiss index) so a long-lived worker can answer many query batches; `search(...)` is the one-shot
form. For sharded keys, search each shard and `merge_shard_results`. The semantics every backend
shares, and the numpy reference, are in `search_base`; importing this module registers every
backend (numpy, torch, faiss-flat, faiss-ivf) in `SEARCH_BACKENDS`. Pure: no Ray here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sepp_ray.errors import SeppError
from sepp_ray.mining import search_faiss, search_torch
from sepp_ray.mining.anchors import Vectors
from sepp_ray.mining.search_base import (
    ALLOWED_DTYPES,
    DEFAULT_DUP_EPS,
    SEARCH_BACKENDS,
    KeySearcher,
    NumpySearcher,
    Pairs,
    Window,
    check_limit,
    check_m,
    id_positions,
    select_top,
)
from sepp_ray.mining.search_faiss import IVF_RECOMMENDED_N
from sepp_ray.mining.search_torch import similarity_block

# Every backend module, imported here (and only here) so that each registers itself.
BACKEND_MODULES = (search_faiss, search_torch)

__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_DUP_EPS",
    "IVF_RECOMMENDED_N",
    "SEARCH_BACKENDS",
    "KeySearcher",
    "NumpySearcher",
    "Pairs",
    "Window",
    "auto_backend",
    "available_backends",
    "build_searcher",
    "check_backend",
    "check_limit",
    "merge_shard_results",
    "search",
    "search_numpy",
    "select_top",
    "similarity_block",
    "similarity_histogram",
]


def merge_shard_results(
    results: list[Pairs], m: int | None, query_ids: np.ndarray | None = None
) -> Pairs:
    """Merge searches of disjoint key shards run with the same anchors: equals one search of
    the union (each shard keeps its own top m, so the global top m is among them).

    Anchors come out in `query_ids` order when given, else by ascending id (the order of
    `choose_anchors`).
    """
    check_m(m)
    allp = Pairs.concat(results)
    pair_keys = np.stack([allp.anchor_id, allp.positive_id], axis=1)  # [P, 2]
    if np.unique(pair_keys, axis=0).shape[0] != len(allp):
        raise SeppError("shard results repeat a pair: the key shards overlap; make them disjoint")
    order_ids = np.unique(allp.anchor_id) if query_ids is None else np.asarray(query_ids)
    qpos = id_positions(allp.anchor_id, order_ids)
    if (qpos < 0).any():
        raise SeppError("shard results name anchors missing from query_ids: pass all anchor ids")
    return select_top(order_ids, qpos, allp.similarity, allp.positive_id, m)


def similarity_histogram(
    sims: np.ndarray, bins: int | np.ndarray = 20, lo: float = -1.0, hi: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Counts and bin edges of similarities over [lo, hi], for the pairs manifest."""
    counts, edges = np.histogram(np.asarray(sims, dtype=np.float64), bins=bins, range=(lo, hi))
    return counts.astype(np.int64), edges


def available_backends(exact: bool | None = None) -> list[str]:
    """Registered backend names; `exact=True` keeps those that must equal the reference."""
    return [n for n in SEARCH_BACKENDS if exact is None or SEARCH_BACKENDS.get(n).exact == exact]


def auto_backend() -> str:
    """torch on CUDA, faiss-flat on CPU. benchmarks/mining.py on 2 CPU cores (D = 512, K = 5%):
    torch is faster up to N = 40k (0.69 s vs 0.89 s) but faiss-flat wins where mining matters,
    N >= 100k (3.05 s vs 3.92 s at 100k, 13.1 s vs 17.9 s at 200k)."""
    return "torch" if torch.cuda.is_available() else "faiss-flat"


def check_backend(backend: str) -> None:
    """SeppError unless `backend` is auto or a registered backend: configs call it before any
    work, so a typo fails before the dataset is embedded."""
    if backend != "auto" and backend not in SEARCH_BACKENDS:
        raise SeppError(
            f"unknown search backend {backend!r}: choose auto or one of {available_backends()}"
        )


def build_searcher(keys: Vectors, backend: str = "auto", **options: Any) -> KeySearcher:
    """Validate and prepare `keys` for repeated searches with one backend."""
    check_backend(backend)
    name = auto_backend() if backend == "auto" else backend
    return SEARCH_BACKENDS.get(name)(keys, **options)


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
