"""Pretraining: optimisers and schedules, and the framework-free training step (no Ray here; the
Ray Train driver imports these inside each worker)."""

from sepp_ray.train.optim import (
    LARS,
    build_optimizer,
    param_groups,
    scaled_lr,
    set_lr,
    warmup_cosine,
)
from sepp_ray.train.rng import rng_state, seed_everything, set_rng_state
from sepp_ray.train.step import (
    LossModule,
    NonFiniteLossError,
    StepConfig,
    Trainer,
    prepare_loss_module,
    train_epoch,
)

__all__ = [
    "LARS",
    "LossModule",
    "NonFiniteLossError",
    "StepConfig",
    "Trainer",
    "build_optimizer",
    "param_groups",
    "prepare_loss_module",
    "rng_state",
    "scaled_lr",
    "seed_everything",
    "set_lr",
    "set_rng_state",
    "train_epoch",
    "warmup_cosine",
]
