"""Barlow Twins (Zbontar et al., arXiv 2103.03230): cross-correlation of the views -> identity.

No negatives, so mined positives have nothing to attract or cancel: Barlow Twins refuses
`pos_ids` and `cancel_ids` (pair use "none"); it takes semantic pairs as dataset items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sepp_ray.losses.barlow_twins import barlow_twins_loss
from sepp_ray.methods.base import METHODS, Inputs, Method, projector_of


@dataclass
class BarlowTwinsHParams:
    """Barlow Twins hyperparameters (paper, sec. 4): 3-layer 8192-d projector, BN + ReLU after
    the first two layers, off-diagonal weight lambda = 0.0051."""

    proj_hidden_dim: int = 8192
    proj_output_dim: int = 8192
    proj_layers: int = 3
    lambda_offdiag: float = 0.0051


@METHODS.register("barlow_twins")
class BarlowTwins(Method):
    """Projector on both views; the loss standardises over the global batch."""

    default_recipe = "barlow_twins"
    hparams_cls = BarlowTwinsHParams

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: BarlowTwinsHParams) -> None:
        super().__init__(backbone, feat_dim, hp)
        self.projector = projector_of(feat_dim, hp)

    def loss(self, x: Inputs) -> torch.Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in x.views[:2])  # N x D, BN per view
        loss = barlow_twins_loss(z1, z2, self.hp.lambda_offdiag, gather=True)
        return loss
