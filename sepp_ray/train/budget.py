"""Equal compute for comparisons: one optimizer-step budget shared by every arm.

A pair arm adds training items (dataset mode: one per mined pair, arXiv 2306.16122), so at
equal epochs it would take more optimizer steps, over a longer cosine schedule, than the plain
run it is compared with, and part of its gain would be compute. The budget is the plain run's
step count, ``train items // batch x epochs`` with the plain run's items = the training split's
images; every arm trains exactly that many steps, so a pair arm runs fewer epochs instead.
"""

from __future__ import annotations

import math
from typing import Any

from sepp_ray.errors import SeppError
from sepp_ray.mining.report_stats import PAIR_SHARE_LIMIT

# pairs.mode values whose pairs become extra training items (the others use them in the loss)
ITEM_MODES = ("dataset", "both")


def split_size(data: dict[str, Any], split: str) -> int:
    """Images in ``split`` of an ingested dataset, from its manifest."""
    splits = data.get("splits", {})
    if split not in splits:
        raise SeppError(f"split {split!r} not in the dataset; it has {sorted(splits)}")
    return int(splits[split]["total"])


def plain_steps(data: dict[str, Any], split: str, batch_size: int, epochs: int) -> int:
    """The plain run's optimizer steps: the budget every arm of a comparison shares."""
    n = split_size(data, split)
    if n < batch_size:
        raise SeppError(
            f"batch_size {batch_size} exceeds the {n} images of split {split!r}: lower it"
        )
    return (n // batch_size) * epochs


def planned_items(n_images: int, num_pairs: int, mode: str, extra: int = 0) -> int:
    """Training items of a run: the split's images, plus one per pair in dataset modes, plus
    ``extra`` (curated pairs); mirrors ``sepp_ray.train.items.build_items``."""
    return n_images + (num_pairs if mode in ITEM_MODES else 0) + extra


def epochs_for(budget_steps: int, steps_per_epoch: int) -> int:
    """Epochs a budgeted run starts (the last one may stop part way)."""
    return max(1, math.ceil(budget_steps / max(1, steps_per_epoch)))


_PAIR_KINDS = ("semantic", "augmentation", "curated")


def pair_share_warning(counts: dict[str, int], limit: float = PAIR_SHARE_LIMIT) -> str | None:
    """A warning when a run's pair items outnumber its originals more than ``limit`` times
    (``counts``: the run's items per kind), naming the fixes; None otherwise. At the plain
    run's optimizer steps the originals are then seen far less than in the plain run, so the
    comparison measures the loss of them as much as the gain of the pairs. A run without
    originals (curated pairs alone) chose that and gets no warning."""
    pairs = sum(int(counts.get(k, 0)) for k in _PAIR_KINDS)
    originals = int(counts.get("original", 0))
    if originals == 0 or pairs <= limit * originals:
        return None
    return (
        f"{pairs} pair items for {originals} originals ({pairs / originals:.1f} per original, "
        f"more than {limit:g}): at equal optimizer steps the originals are barely seen. Mine "
        "fewer pairs: raise mining.lo, or cap the positives per anchor with mining.m"
    )
