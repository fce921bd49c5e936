"""Positives per anchor at mining: the distribution in the manifest and the pairs report, one
console line, and a warning naming the fix when the pairs would swamp the images."""

from __future__ import annotations

from typing import Any

import numpy as np

from sepp_ray.mining.pairs_report import per_anchor_table
from sepp_ray.mining.report_stats import (
    PAIR_SHARE_LIMIT,
    crowding_warning,
    per_anchor_line,
    positives_per_anchor,
)


def _manifest(anchor_ids: np.ndarray, k: int, n: int, m: int | None = None) -> dict[str, Any]:
    return {
        "n": n,
        "k": k,
        "m": m,
        "num_pairs": len(anchor_ids),
        "positives_per_anchor": positives_per_anchor(anchor_ids, k),
    }


def test_the_distribution_counts_every_anchor_including_those_without_a_positive() -> None:
    # 10 anchors: 4 without a positive, then 1, 1, 3, 5, 9 and 300 positives
    counts = [0, 0, 0, 0, 1, 1, 3, 5, 9, 300]
    ids = np.repeat(np.arange(10), counts)
    rng = np.random.default_rng(0)
    d = positives_per_anchor(rng.permutation(ids), 10)
    assert d["mean"] == sum(counts) / 10 and d["max"] == 300
    assert d["median"] == float(np.median(counts)) and d["p90"] == float(np.quantile(counts, 0.9))
    assert d["histogram"] == {
        "0": 4,
        "1": 2,
        "2-3": 1,
        "4-7": 1,
        "8-15": 1,
        "16-31": 0,
        "32-63": 0,
        "64-127": 0,
        "128-255": 0,
        "256+": 1,
    }
    assert sum(d["histogram"].values()) == 10
    table = per_anchor_table({"positives_per_anchor": d})
    assert table[1].startswith("| positives per anchor | 0 | 1 | 2-3 |")
    assert table[3] == "| anchors | 4 | 2 | 1 | 1 | 1 | 0 | 0 | 0 | 0 | 1 |"


def test_one_console_line_and_a_warning_for_a_weak_samplers_flood_of_pairs() -> None:
    # the case: 2,000 anchors of 10,000 images with 386 positives each
    flood = _manifest(np.repeat(np.arange(2000), 386), 2000, 10_000)
    line = per_anchor_line(flood)
    assert "mean 386, median 386" in line and "77.20 per image" in line and "(m=None)" in line
    text = crowding_warning(flood)
    assert text is not None and "77.2 per image" in text and f"{PAIR_SHARE_LIMIT:g}" in text
    assert "Raise lo" in text and "with m" in text
    # the paper's K = 5% with a handful of positives each: no warning
    calm = _manifest(np.repeat(np.arange(500), 4), 500, 10_000, m=4)
    assert crowding_warning(calm) is None and "max 4 (m=4)" in per_anchor_line(calm)
