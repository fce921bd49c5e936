"""Inputs of a semantic-pair search: anchors, embedding vectors and thresholds, all validated.

SePP (arXiv 2306.16122) mines positives for K randomly chosen anchors among N images: pairs of
different images whose pre-trained embeddings have cosine similarity in [lo, hi]. Everything a user
can get wrong (thresholds, K, non-unit or non-finite vectors, duplicate ids) is refused here with a
`SeppError` before any search work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sepp_ray.errors import SeppError

# Host (numpy) or device (torch) float32 rows; the torch backend keeps device tensors in place.
Array = np.ndarray | torch.Tensor

NORM_TOL = 1e-3  # |norm - 1| allowed: embeddings written as float32 after normalisation pass easily
_VALIDATE_ROWS = 65536  # rows per validation chunk: bounds the temporary memory


@dataclass(frozen=True)
class Vectors:
    """Ids (int64 [N]) and their L2-normalised float32 embeddings ([N, D], numpy or torch)."""

    ids: np.ndarray
    vecs: Array

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vecs.shape[1])

    def numpy(self) -> np.ndarray:
        """The vectors as a host float32 array (no copy when they already are)."""
        if isinstance(self.vecs, torch.Tensor):
            return self.vecs.detach().to("cpu").numpy()
        return self.vecs

    def take(self, rows: np.ndarray) -> Vectors:
        """The subset at positions `rows` (used to shard queries or keys)."""
        if isinstance(self.vecs, torch.Tensor):
            return Vectors(self.ids[rows], self.vecs[torch.from_numpy(rows).to(self.vecs.device)])
        return Vectors(self.ids[rows], self.vecs[rows])


def validate_thresholds(lo: float, hi: float) -> tuple[float, float]:
    """Check -1 <= lo <= hi <= 1 (cosine similarities), returning them as floats."""
    try:
        lo_f, hi_f = float(lo), float(hi)
    except (TypeError, ValueError) as err:
        raise SeppError(f"thresholds must be numbers, got lo={lo!r}, hi={hi!r}") from err
    if math.isnan(lo_f) or math.isnan(hi_f):
        raise SeppError(f"thresholds must not be NaN (lo={lo_f}, hi={hi_f}); pass e.g. 0.96 0.99")
    for name, v in (("lo", lo_f), ("hi", hi_f)):
        if not -1.0 <= v <= 1.0:
            raise SeppError(f"threshold {name}={v} is outside [-1, 1], where cosines lie")
    if lo_f > hi_f:
        raise SeppError(f"lower threshold {lo_f} exceeds upper {hi_f}: swap them (e.g. 0.96 0.99)")
    return lo_f, hi_f


def validate_ids(ids: np.ndarray, what: str) -> np.ndarray:
    """Ids must be a non-empty 1-D integer array without repeats (they name images)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] == 0:
        raise SeppError(f"{what} ids must be a non-empty 1-D array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise SeppError(f"{what} ids must be integers, got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if np.unique(ids).shape[0] != ids.shape[0]:
        raise SeppError(f"{what} ids contain repeats: each image must appear once; deduplicate")
    return ids


def validate_vectors(v: Vectors, what: str) -> Vectors:
    """Refuse non-float32, non-finite or non-unit rows, naming how many rows are bad and why.

    A non-unit row would make inner products stop being cosine similarities, silently moving
    every pair relative to the thresholds; NaN rows would never match and hide a broken encoder.
    """
    ids = validate_ids(v.ids, what)
    x = v.vecs
    if x.ndim != 2 or x.shape[0] != ids.shape[0] or x.shape[1] == 0:
        raise SeppError(
            f"{what} vectors must be [N, D] with N = len(ids) = {ids.shape[0]}, "
            f"got {tuple(x.shape)}"
        )
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype != torch.float32:
        raise SeppError(f"{what} vectors must be float32, got {t.dtype}; cast them to float32")
    bad_finite = bad_norm = 0
    worst = 0.0
    for start in range(0, t.shape[0], _VALIDATE_ROWS):
        chunk = t[start : start + _VALIDATE_ROWS]
        norms = torch.linalg.vector_norm(chunk, dim=1)  # [c]; NaN/inf iff a row holds one
        nonfinite = ~torch.isfinite(norms)
        if bool(nonfinite.any()):
            rows = chunk[nonfinite]
            bad_finite += int((~torch.isfinite(rows).all(dim=1)).sum())
            bad_norm += int(torch.isfinite(rows).all(dim=1).sum())  # overflowed, finite rows
        dev = (norms[~nonfinite] - 1.0).abs()
        if dev.numel():
            bad_norm += int((dev > NORM_TOL).sum())
            worst = max(worst, float(dev.max()))
    if bad_finite:
        raise SeppError(
            f"{bad_finite} {what} vector rows contain NaN or inf: re-embed those images "
            "(check the encoder and the decoded images)"
        )
    if bad_norm:
        raise SeppError(
            f"{bad_norm} {what} vector rows are not unit norm (worst |norm - 1| = {worst:.3g} > "
            f"{NORM_TOL}): L2-normalise the embeddings before the search"
        )
    return Vectors(ids, x)


def resolve_k(k: int | float, n: int) -> int:
    """K as a count (int) or as a fraction of N in (0, 1] (float), checked against N."""
    if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)):
        raise SeppError(f"K must be a count (int) or a fraction in (0, 1] (float), got {k!r}")
    if n <= 0:
        raise SeppError("no images to choose anchors from: the embedding set is empty")
    if isinstance(k, (float, np.floating)):
        if not 0.0 < float(k) <= 1.0:
            raise SeppError(f"K fraction {k} must lie in (0, 1]; pass a count as an int instead")
        count = round(float(k) * n)
        if count == 0:
            raise SeppError(f"K fraction {k} of {n} images selects no anchor: raise the fraction")
        return int(count)
    if k <= 0:
        raise SeppError(f"K = {k} selects no anchor: pass a positive count or a fraction")
    if k > n:
        raise SeppError(f"K = {k} exceeds the {n} images available: lower K or pass a fraction")
    return int(k)


def choose_anchors(ids: np.ndarray, k: int | float, seed: int) -> np.ndarray:
    """K anchor ids drawn uniformly without replacement, sorted ascending.

    Ids are sorted first so the draw depends only on the id set and the seed, not on the order
    the embeddings arrived in (Ray Data does not keep order).
    """
    ids = validate_ids(ids, "image")
    count = resolve_k(k, ids.shape[0])
    pool = np.sort(ids)
    picked = np.random.default_rng(seed).choice(pool.shape[0], size=count, replace=False)
    return np.sort(pool[picked])
