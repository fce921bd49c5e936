"""SimSiam (Chen & He, arXiv 2011.10566): a predictor and a stop-gradient, no target network.

No negatives, so mined positives have nothing to attract or cancel: SimSiam refuses
`pos_ids` and `cancel_ids` (pair use "none"); it takes semantic pairs as dataset items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sepp_ray.losses.negative_cosine import negative_cosine_similarity
from sepp_ray.methods.base import METHODS, Inputs, Method, projector_of
from sepp_ray.models.heads import prediction_mlp


@dataclass
class SimSiamHParams:
    """SimSiam hyperparameters (paper, sec. 3): 3-layer 2048-d projector with BN on its output,
    bottleneck predictor 2048 -> 512 -> 2048. On CIFAR the paper uses a 2-layer projector."""

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 2048
    proj_layers: int = 3
    pred_hidden_dim: int = 512


@METHODS.register("simsiam")
class SimSiam(Method):
    """Symmetrised D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with negative cosine D."""

    default_recipe = "simsiam"
    hparams_cls = SimSiamHParams

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: SimSiamHParams) -> None:
        super().__init__(backbone, feat_dim, hp)
        self.projector = projector_of(feat_dim, hp, last_bn=True)
        self.predictor = prediction_mlp(hp.proj_output_dim, hp.pred_hidden_dim, hp.proj_output_dim)

    def loss(self, x: Inputs) -> torch.Tensor:
        z1, z2 = (self.projector(self.backbone(v)) for v in x.views[:2])  # N x D, BN per view
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = 0.5 * (
            negative_cosine_similarity(p1, z2.detach())
            + negative_cosine_similarity(p2, z1.detach())
        )
        return loss
