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


# pair items per image beyond which mining and pretraining warn: past it, a dataset-mode run
# spends most of the plain run's steps on pairs (sepp_ray.train.budget.pair_share_warning)
PAIR_SHARE_LIMIT = 1.0


def positives_per_anchor(anchor_ids: np.ndarray, n_anchors: int) -> dict[str, Any]:
    """How many positives each anchor got (anchors without one count as 0): mean, quantiles,
    max and a histogram in powers of two, so a window too wide for its sampler shows at once."""
    _, per = np.unique(anchor_ids, return_counts=True)
    counts = np.concatenate([per, np.zeros(max(0, n_anchors - len(per)), np.int64)])
    if len(counts) == 0:
        counts = np.zeros(1, np.int64)
    edges = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    bins = [(lo, hi - 1) for lo, hi in zip(edges, edges[1:], strict=False)]
    hist = {_label(lo, hi): int(((counts >= lo) & (counts <= hi)).sum()) for lo, hi in bins}
    hist[f"{edges[-1]}+"] = int((counts >= edges[-1]).sum())
    q = np.quantile(counts, [0.5, 0.9, 0.99])
    return {
        "mean": round(float(counts.mean()), 4),
        "median": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "max": int(counts.max()),
        "histogram": hist,
        "note": "over all anchors; m caps it when set, else every image in [lo, hi]",
    }


def _label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def per_anchor_line(m: dict[str, Any]) -> str:
    """The console's line on a mining's positives per anchor (``m``: its manifest)."""
    per = m["positives_per_anchor"]
    share = m["num_pairs"] / max(1, m["n"])
    return (
        f"positives per anchor: mean {per['mean']:g}, median {per['median']:g}, p90 "
        f"{per['p90']:g}, max {per['max']} (m={m.get('m')}); as pair items "
        f"{share:.2f} per image"
    )


def crowding_warning(m: dict[str, Any], limit: float = PAIR_SHARE_LIMIT) -> str | None:
    """A warning when the pairs, as dataset-mode items, would outnumber the images more than
    ``limit`` times, naming the fixes; None otherwise."""
    n, pairs = int(m["n"]), int(m["num_pairs"])
    if n == 0 or pairs <= limit * n:
        return None
    return (
        f"{pairs} pairs for {n} images ({pairs / n:.1f} per image, more than {limit:g}): as "
        "training items they would swamp the originals at equal steps. Raise lo, or cap the "
        "positives per anchor with m"
    )
