"""A run's schedules, fixed by the plain run whatever the arm.

Arms of a comparison differ in their items: a pair arm adds one per mined pair, so its data
epoch is longer than the plain run's. A schedule counted in the arm's own epochs would then
differ with the pairs (a warm-up of 10 epochs is 10 of 30 steps for plain and 15 of 30 for a
pair arm; MoCo's queue sized from the items holds half again as many keys), and part of a
measured gain would be the schedule, not the pairs. So every schedule and every data-sized
buffer here follows the plain run: its epoch is the split's images // batch_size (the
originals, no pair items), the *reference epoch*; warm-up, DINO's teacher-temperature warm-up
and frozen last layer are counted in reference epochs of optimizer steps; the learning rate,
weight decay and EMA momentum follow the step over the run's steps; MoCo's queue and NNCLR's
support set are sized from the split's images. `plan_schedule` is the one pure function the
driver calls, so a test can plan every arm without Ray and compare them step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sepp_ray.errors import SeppError

if TYPE_CHECKING:
    from sepp_ray.train.optim_defaults import OptimRecipe

# hyperparameters sized from the data (MoCo's queue, NNCLR's support set): recorded per run
BUFFER_HPARAMS = ("queue_size",)


@dataclass(frozen=True)
class Schedule:
    """The optimizer-step schedule of one run.

    reference_images: the split's images, a plain run's items per epoch. reference_steps_per_epoch:
    reference_images // batch_size, the unit every epoch-counted schedule is in.
    steps_per_epoch: the arm's own data epoch (its items // batch_size): how the data is cut,
    never what a schedule counts. total_steps and warmup_steps: the run's optimizer steps and
    the learning rate's linear warm-up. hparams: the method's hyperparameters fitted to the
    reference images (`sepp_ray.methods.fit_hparams`). scale: the data scale whose method
    recipe applied (`sepp_ray.methods.scale`).
    """

    reference_images: int
    batch_size: int
    reference_steps_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    hparams: dict[str, Any] = field(default_factory=dict)
    scale: str = ""

    def epoch_at(self, step: int) -> int:
        """The reference epoch of 0-based `step`: what a method's epoch-counted schedule reads
        (DINO's teacher temperature and frozen last layer), equal in every arm at one step."""
        return step // self.reference_steps_per_epoch

    @property
    def reference_epochs(self) -> int:
        """Reference epochs the run spans (the last may be partial)."""
        return math.ceil(self.total_steps / self.reference_steps_per_epoch)

    def to_dict(self) -> dict[str, Any]:
        """What the run's manifest records under "schedule"."""
        buffers = {k: self.hparams[k] for k in BUFFER_HPARAMS if k in self.hparams}
        return {
            "reference_images": self.reference_images,
            "reference_steps_per_epoch": self.reference_steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "reference_epochs": self.reference_epochs,
            "data_scale": self.scale,
            **buffers,
        }


def _steps(n: int, batch_size: int, what: str) -> int:
    if n < batch_size:
        raise SeppError(f"batch_size {batch_size} exceeds the {n} {what}: lower it")
    return n // batch_size


def plan_schedule(
    method: str,
    overrides: dict[str, Any],
    optim: OptimRecipe,
    *,
    images: int,
    items: int,
    batch_size: int,
    epochs: int,
    budget_steps: int | None,
    backbone: str = "",
) -> Schedule:
    """The schedule of a run over ``items`` training items of a split of ``images`` images.

    ``epochs`` counts the run's data epochs when no ``budget_steps`` is set (so a pair arm
    without a budget takes more steps, as ``budget_steps``'s help says); the warm-up is
    ``optim.warmup_epochs`` reference epochs, kept below the run's length so a short run still
    decays. Hyperparameters get the data-scale recipe of ``images`` and ``backbone``
    (`sepp_ray.methods.scale`) under ``overrides``, and buffers no longer than ``images``.
    """
    from sepp_ray.methods import fit_hparams
    from sepp_ray.methods.scale import DataScale

    ref_spe = _steps(images, batch_size, "images of the split")
    spe = _steps(items, batch_size, "training items")
    total = budget_steps or spe * epochs
    ref_epochs = math.ceil(total / ref_spe)
    warmup = min(optim.warmup_steps(ref_spe, ref_epochs), total - 1)
    scale = DataScale(images, backbone)
    hparams = fit_hparams(method, overrides, images, scale=scale)
    return Schedule(images, batch_size, ref_spe, spe, total, max(0, warmup), hparams, scale.name)
