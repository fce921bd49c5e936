"""Supervised contrastive learning (Khosla et al., arXiv 2004.11362): the oracle upper bound.

Class labels play the role of ids: the caller passes LABELS in `ids`, so every image of the same
class is a positive (SupCon's L_out loss). This gives the ceiling that mined semantic positives
(SePP) approach without labels. `pos_ids` still adds positives, as labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from sepp_ray.methods.base import register_method
from sepp_ray.methods.simclr import SimCLR, SimCLRHParams


@dataclass
class SupConHParams(SimCLRHParams):
    """SupCon hyperparameters: 2-layer MLP 2048 -> 128 head, temperature 0.1 (paper, sec. 4)."""

    temperature: float = 0.1


@register_method("supcon")
class SupCon(SimCLR):
    """SimCLR's model and loss, called as `training_loss(views, ids=labels, ...)`."""

    default_recipe = "simclr"
    hparams_cls = SupConHParams
    supports_multi_positive = True
