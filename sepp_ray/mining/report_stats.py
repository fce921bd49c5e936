"""Numbers that describe mined pairs: similarity histograms, pair precision, threshold curve.

Pair precision is the share of pairs whose two images carry the same label: it measures the
sampler (labels never choose pairs). It is computed only over pairs whose both images are
labeled.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sepp_ray.mining.search_base import Pairs


def _precision(pairs: Pairs, labels: dict[int, int]) -> tuple[float | None, int, np.ndarray]:
    la = np.array([labels.get(int(a), -1) for a in pairs.anchor_id], dtype=np.int64)
    lp = np.array([labels.get(int(p), -1) for p in pairs.positive_id], dtype=np.int64)
    known = (la >= 0) & (lp >= 0)
    n = int(known.sum())
    same = (la == lp) & known
    return (float(same.sum() / n) if n else None), n, np.stack([la, lp, same.astype(np.int64)])


def threshold_curve(
    cands: Pairs, labels: dict[int, int] | None, grid: np.ndarray
) -> list[dict[str, Any]]:
    """For each lower threshold in ``grid``: pairs kept, anchors covered, precision."""
    rows = []
    for t in grid:
        keep = cands.similarity >= np.float32(t)
        sub = Pairs(
            cands.anchor_id[keep], cands.positive_id[keep], cands.similarity[keep], cands.rank[keep]
        )
        row: dict[str, Any] = {
            "lo": round(float(t), 4),
            "pairs": int(keep.sum()),
            "anchors_with_positive": int(len(np.unique(sub.anchor_id))),
        }
        if labels is not None:
            prec, _, _ = _precision(sub, labels)
            row["precision"] = None if prec is None else round(prec, 4)
        rows.append(row)
    return rows


def pair_statistics(
    pairs: Pairs,
    cands: Pairs,
    anchors: np.ndarray,
    lo: float,
    hi: float,
    labels: dict[int, int] | None,
    classes: list[str],
) -> dict[str, Any]:
    top1 = cands.similarity[cands.rank == 1]
    low = float(np.floor(min(top1.min(initial=lo), lo) * 20) / 20) if len(top1) else lo
    edges = np.linspace(max(-1.0, low), 1.0, 81)
    out: dict[str, Any] = {
        "similarity_histogram": {
            "edges": [round(float(e), 5) for e in edges],
            "nearest_neighbour": np.histogram(top1, edges)[0].tolist(),
            "pairs": np.histogram(pairs.similarity, edges)[0].tolist(),
            "note": "nearest_neighbour: each anchor's most similar other image below hi",
        },
    }
    grid = np.unique(np.round(np.concatenate([np.arange(0.80, 0.995, 0.01), [lo]]), 4))
    out["threshold_curve"] = threshold_curve(cands, labels, grid[grid <= hi])
    if labels is None:
        out["precision"] = None
        return out
    prec, n_known, (la, _, same) = _precision(pairs, labels)
    per_class: dict[str, Any] = {}
    for c in np.unique(la[la >= 0]):
        sel = la == c
        name = classes[c] if c < len(classes) else str(c)
        per_class[name] = {"pairs": int(sel.sum()), "precision": round(float(same[sel].mean()), 4)}
    out["precision"] = {
        "overall": None if prec is None else round(prec, 4),
        "labeled_pairs": n_known,
        "per_class": per_class,
    }
    return out
