"""VICReg (Bardes et al., arXiv 2105.04906): variance-invariance-covariance regularisation.

No negatives, so mined positives have nothing to attract or cancel: VICReg refuses
`pos_ids` and `cancel_ids` (pair use "none"); it takes semantic pairs as dataset items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sepp_ray.losses.vicreg import vicreg_loss
from sepp_ray.methods.base import METHODS, Inputs, Method, projector_of


@dataclass
class VICRegHParams:
    """VICReg hyperparameters (paper, sec. 4.1): 3-layer 8192-d expander,
    lambda = mu = 25 (invariance, variance), nu = 1 (covariance)."""

    proj_hidden_dim: int = 8192
    proj_output_dim: int = 8192
    proj_layers: int = 3
    sim_coeff: float = 25.0
    std_coeff: float = 25.0
    cov_coeff: float = 1.0


@METHODS.register("vicreg")
class VICReg(Method):
    """Expander on both views, VICReg loss with variance/covariance over the global batch."""

    default_recipe = "vicreg"
    hparams_cls = VICRegHParams

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: VICRegHParams) -> None:
        super().__init__(backbone, feat_dim, hp)
        self.projector = projector_of(feat_dim, hp)

    def loss(self, x: Inputs) -> torch.Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in x.views[:2])  # N x D, BN per view
        loss = vicreg_loss(
            z1, z2, self.hp.sim_coeff, self.hp.std_coeff, self.hp.cov_coeff, gather=True
        )
        return loss
