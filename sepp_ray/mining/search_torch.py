"""The torch backend of the pair search: exact similarity blocks (fp32, or fp16 inputs with fp32
accumulation on CUDA; never bf16, never TF32) and, per block, every in-window entry (m = None)
or a top-k (a cap m), on the keys' device. Semantics are those of `search_base` (its module doc).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from sepp_ray.errors import SeppError
from sepp_ray.mining.anchors import Vectors
from sepp_ray.mining.search_base import (
    ALLOWED_DTYPES,
    SEARCH_BACKENDS,
    KeySearcher,
    Pairs,
    Window,
    check_limit,
    concat_columns,
    select_top,
)


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


def _block_all(
    sims: torch.Tensor, self_col: torch.Tensor, win: Window
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every in-window entry of one [r, c] similarity block, the anchor itself excluded: a range
    search, so no in-window key is lost to a fixed k. Returns (row, similarity, column)."""
    c = sims.shape[1]
    ok = (sims >= win.lo) & (sims <= win.upper)  # [r, c]
    mine = torch.nonzero((self_col >= 0) & (self_col < c)).squeeze(1)  # rows whose anchor is here
    ok[mine, self_col[mine]] = False
    r, cc = torch.nonzero(ok).unbind(1)
    return r, sims[r, cc], cc


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


@SEARCH_BACKENDS.register("torch")
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

    def _search(
        self, q: Vectors, self_pos: np.ndarray, win: Window, m: int | None, limit: int | None
    ) -> Pairs:
        dev, n, nq = self.device, len(self.keys), len(q)
        qv = _to_device(q.vecs, dev, self.dtype)  # [Q, D]
        qself = torch.from_numpy(self_pos).to(dev)  # [Q] key position of the anchor, -1 none
        starts = list(range(0, n, self.key_chunk))
        if m is None:
            return self._search_all(q, qv, qself, starts, win, limit)
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
        qpos, sim, key_pos = concat_columns(parts)
        return select_top(q.ids, qpos, sim, self.keys.ids[key_pos], m)

    def _search_all(
        self,
        q: Vectors,
        qv: torch.Tensor,
        qself: torch.Tensor,
        starts: list[int],
        win: Window,
        limit: int | None,
    ) -> Pairs:
        """Every in-window key of every anchor, block by block (host copy per block)."""
        parts: list[tuple[np.ndarray, ...]] = []
        found = 0
        with _exact_matmul(self.device), torch.inference_mode():
            for s in starts:
                kb = self._key_block(s, s + self.key_chunk)  # [c, D]
                for r in range(0, len(q), self.query_chunk):
                    rq = slice(r, r + self.query_chunk)
                    sims = similarity_block(qv[rq], kb)  # [r, c] fp32
                    rows, vals, cols = _block_all(sims, qself[rq] - s, win)
                    part = ((rows + r).cpu(), vals.cpu(), (cols + s).cpu())
                    parts.append(tuple(t.numpy() for t in part))
                    found += len(part[0])
                    check_limit(found, limit)
        qpos, sim, key_pos = concat_columns(parts)
        return select_top(q.ids, qpos, sim, self.keys.ids[key_pos], None)
