"""BYOL (Grill et al., arXiv 2006.07733): online network predicts an EMA target's projection.

No negatives, so mined positives have nothing to attract or cancel: BYOL refuses
`pos_ids` and `cancel_ids` (pair use "none"); it takes semantic pairs as dataset items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sepp_ray.losses.negative_cosine import byol_loss
from sepp_ray.methods.base import (
    METHODS,
    Inputs,
    Method,
    Metrics,
    cosine_momentum,
    ema_update,
    momentum_copy,
)
from sepp_ray.models.heads import prediction_mlp, projection_mlp


@dataclass
class BYOLHParams:
    """BYOL hyperparameters: projector and predictor 4096 -> 256 MLPs with BN (paper, sec. 3.3).

    Target momentum rises from `momentum` to 1 along a cosine. The paper uses 0.996 at 1000
    epochs on ImageNet; 0.99 is the usual value for CIFAR and the shorter runs this project does.
    """

    proj_hidden_dim: int = 4096
    proj_output_dim: int = 256
    pred_hidden_dim: int = 4096
    momentum: float = 0.99

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")


@METHODS.register("byol")
class BYOL(Method):
    """Symmetrised BYOL loss; target = EMA of backbone + projector, updated after each step."""

    momentum_attr = "target_backbone"

    default_recipe = "byol"
    hparams_cls = BYOLHParams

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: BYOLHParams) -> None:
        super().__init__(backbone, feat_dim, hp)
        self.projector = projection_mlp(feat_dim, hp.proj_hidden_dim, hp.proj_output_dim, 2)
        self.predictor = prediction_mlp(hp.proj_output_dim, hp.pred_hidden_dim, hp.proj_output_dim)
        self.target_backbone = momentum_copy(backbone)
        self.target_projector = momentum_copy(self.projector)
        self.current_momentum = hp.momentum

    def loss(self, x: Inputs) -> torch.Tensor:
        # one pass per view: BN statistics per view, as in the paper's implementation
        views = x.views
        p1, p2 = (self.predictor(self.projector(self.backbone(v))) for v in views[:2])  # N x D
        with torch.no_grad():
            z1, z2 = (self.target_projector(self.target_backbone(v)) for v in views[:2])
        loss = 0.5 * (byol_loss(p1, z2) + byol_loss(p2, z1))
        return loss

    def step_metrics(self, epoch: int) -> Metrics:
        return {"momentum": self.current_momentum}

    def on_train_step_end(self, progress: float) -> None:
        self.current_momentum = cosine_momentum(self.hp.momentum, progress)
        ema_update(self.target_backbone, self.backbone, self.current_momentum)
        ema_update(self.target_projector, self.projector, self.current_momentum)
