"""Pure SSL losses: one per file, device-agnostic, across ranks only through `sepp_ray.dist`."""

from sepp_ray.losses.barlow_twins import barlow_twins_loss
from sepp_ray.losses.dino import DINOLoss
from sepp_ray.losses.info_nce import (
    info_nce_loss,
    pair_counts,
    positive_mask,
    resolve_masks,
    same_image_mask,
    self_mask,
)
from sepp_ray.losses.negative_cosine import byol_loss, negative_cosine_similarity
from sepp_ray.losses.vicreg import vicreg_loss

__all__ = [
    "DINOLoss",
    "barlow_twins_loss",
    "byol_loss",
    "info_nce_loss",
    "negative_cosine_similarity",
    "pair_counts",
    "positive_mask",
    "resolve_masks",
    "same_image_mask",
    "self_mask",
    "vicreg_loss",
]
