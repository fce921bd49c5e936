"""Reports at fixed optimizer steps, whatever an epoch's length.

Runs that differ in their items (a pair arm, a sweep trial whose K or thresholds change the
pair count) have epochs of different lengths: reports at epoch ends would compare one trial at
step 15 with another at step 13, and ASHA (arXiv 1810.05934) would judge them at unequal
compute. With ``report_every_steps = R`` a run reports at steps R, 2R, ... and at its last
step: an epoch is trained in segments that end at those milestones (`train_epoch` stops at a
step boundary and the next segment goes on with the same batch iterator, so the data order is
the one an unsegmented epoch has), and every rank reports at the same steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sepp_ray.train.step import Trainer, train_epoch


def segment_ends(start: int, steps: int, every: int | None, total: int) -> list[int]:
    """Global steps at which the segments of an epoch of ``steps`` steps from ``start`` end:
    each milestone (a multiple of ``every``) inside it, the run's last step ``total``, and the
    epoch's end. ``every`` None: one segment, the epoch."""
    end = start + steps
    cuts = {end}
    if every:
        cuts |= {s for s in range(start + 1, end + 1) if s % every == 0 or s == total}
    return sorted(cuts)


def is_milestone(step: int, every: int | None, total: int) -> bool:
    """Whether the run reports after global step count ``step`` (every R steps, and the end)."""
    return bool(every) and (step % every == 0 or step == total)  # type: ignore[operator]


def combine(parts: list[dict[str, float]]) -> dict[str, float]:
    """One epoch's stats from its segments' (`train_epoch` outputs): means weighted by steps,
    the last segment's ``lr`` and ``last_step``, and items per second over the whole time."""
    steps = sum(p["steps"] for p in parts)
    keys = set(parts[0]) - {"lr", "steps", "pairs_per_s", "last_step", "next_step"}
    out = {k: sum(p[k] * p["steps"] for p in parts) / steps for k in keys}
    out.update(
        lr=parts[-1]["lr"],
        steps=steps,
        pairs_per_s=_rate(parts),
        last_step=parts[-1]["last_step"],
        next_step=parts[-1]["next_step"],
    )
    return out


def _rate(parts: list[dict[str, float]]) -> float:
    """Items per second over segments of equal batches: steps over the summed step times."""
    steps = sum(p["steps"] for p in parts)
    seconds = sum(p["steps"] / p["pairs_per_s"] for p in parts if p["pairs_per_s"] > 0)
    return steps / seconds if seconds > 0 else float("inf")


def train_to_milestones(
    trainer: Trainer,
    batches: Iterable[dict[str, Any]],
    epoch: int,
    start: int,
    steps: int,
    *,
    every: int | None,
    total: int,
    reference_steps: int,
    on_report: Callable[[dict[str, float], int], None],
) -> dict[str, float]:
    """Train epoch ``epoch`` (global steps ``start`` .. ``start + steps - 1``) in segments
    ending at the milestones, calling ``on_report(segment stats, global steps done)`` at each;
    returns the whole epoch's stats (`combine`)."""
    it = iter(batches)
    parts: list[dict[str, float]] = []
    done = start
    for end in segment_ends(start, steps, every, total):
        part = train_epoch(
            trainer, it, epoch, done, reference_steps=reference_steps, max_steps=end - done
        )
        parts.append(part)
        done = end
        if is_milestone(end, every, total):
            on_report(part, end)
    return combine(parts)
