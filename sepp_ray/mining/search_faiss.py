"""FAISS backends of the pair search: exact IndexFlatIP and approximate IndexIVFFlat, on the GPU
when faiss has GPU support and CUDA is present. Semantics are those of `search_base` (its
module doc); faiss returns plain top-k, so k doubles per anchor until the window is settled: with
m = None (every in-window key) until the k-th similarity falls below lo. faiss itself is
imported only when an index is built: this module loads (and registers) without it.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import numpy as np
import torch

from sepp_ray.mining.anchors import Vectors
from sepp_ray.mining.search_base import (
    SEARCH_BACKENDS,
    KeySearcher,
    Pairs,
    Window,
    check_limit,
    concat_columns,
    select_top,
)

IVF_RECOMMENDED_N = 150_000  # CPU key count past which faiss-ivf beats exact search (see below)


class _FaissSearcher(KeySearcher):
    """Shared loop for faiss indexes, which return plain top k: k doubles per anchor until its
    k-th similarity is below lo, or (with a cap m) it holds m in-range keys strictly above it."""

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

    def _search(
        self, q: Vectors, self_pos: np.ndarray, win: Window, m: int | None, limit: int | None
    ) -> Pairs:
        qv, n = np.ascontiguousarray(q.numpy()), len(self.keys)
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        start = 32 if m is None else max(2 * m, m + 8)
        pending, k, level = np.arange(len(q)), min(n, start), 0
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
            if m is None:  # with a cap the output is at most m per anchor, checked at the end
                check_limit(sum(len(o[0]) for o in out), limit)
        if not out:
            return Pairs.empty()
        qpos, sims, cols = concat_columns(out)
        return select_top(q.ids, qpos, sims, self.keys.ids[cols], m)

    def _round(
        self,
        index: Any,
        qv: np.ndarray,
        rows: np.ndarray,
        self_pos: np.ndarray,
        k: int,
        win: Window,
        m: int | None,
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ) -> np.ndarray:
        """Search `rows` with k; append candidates of finished rows to `out`, return done."""
        sims, pos = index.search(qv[rows], k)  # [p, k] descending similarity
        valid = (pos >= 0) & (sims >= win.lo) & (sims <= win.upper)
        valid &= pos != self_pos[rows][:, None]
        last = sims[:, -1]
        exhausted = (pos[:, -1] < 0) | (k >= len(self.keys))
        # complete once every in-window key was returned (the k-th is below lo), or with a cap
        # once every key tied with or above the m-th in-range one was
        done = exhausted | (last < win.lo)
        if m is not None:
            mth = sims[np.arange(rows.size), np.argmax(valid.cumsum(1) >= m, axis=1)]  # [p]
            done |= (valid.sum(1) >= m) & (mth > last)
        r, c = np.nonzero(valid & done[:, None])
        out.append((rows[r], sims[r, c], pos[r, c]))
        return done


@SEARCH_BACKENDS.register("faiss-flat")
class FaissFlatSearcher(_FaissSearcher):
    """Exact inner-product index (IndexFlatIP), on the GPU when faiss was built with it."""

    def _build(self, x: np.ndarray) -> Any:
        import faiss

        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        return index


@SEARCH_BACKENDS.register("faiss-ivf")
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
