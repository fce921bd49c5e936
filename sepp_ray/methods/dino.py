"""DINO (Caron et al., arXiv 2104.14294): self-distillation with an EMA teacher and centring.

No negatives, so mined positives have nothing to attract or cancel: DINO refuses
`pos_ids` and `cancel_ids` (pair use "none"); it takes semantic pairs as dataset items.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sepp_ray.losses.dino import DINOLoss
from sepp_ray.methods.base import (
    METHODS,
    Inputs,
    Method,
    Metrics,
    cosine_momentum,
    ema_update,
    momentum_copy,
)
from sepp_ray.models.heads import DINOHead


@dataclass
class DINOHParams:
    """DINO hyperparameters, the authors' defaults (paper sec. 3 and appendix; their main_dino.py).

    Head: 3-layer MLP 2048 -> bottleneck 256 -> weight-normalised 65536 prototypes (smaller
    `out_dim`, e.g. 4096, suits CIFAR). Teacher temperature 0.04 (the paper warms 0.04 -> 0.07
    over 30 epochs for long ViT runs), student 0.1, centre momentum 0.9, teacher momentum
    0.996 -> 1 cosine, last layer frozen for the first epoch. `epochs` is the run's length,
    which the temperature warm-up needs; `use_bn_in_head=True` is the authors' ResNet setting.

    Epochs here are reference epochs: the plain run's epoch of optimizer steps (the split's
    images // batch), not the arm's data epoch (`sepp_ray.train.schedule`). The training loop
    passes `epoch = step // reference steps per epoch`, so a pair arm, whose data epochs are
    longer, warms its teacher temperature and unfreezes its last layer at the same step as
    plain; the teacher momentum follows the step over the run's steps.
    """

    out_dim: int = 65536
    proj_hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    use_bn_in_head: bool = False
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    momentum: float = 0.996
    epochs: int = 100
    freeze_last_layer_epochs: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if min(self.teacher_temp, self.warmup_teacher_temp, self.student_temp) <= 0:
            raise ValueError("teacher_temp, warmup_teacher_temp and student_temp must be > 0")
        if not 0 <= self.warmup_teacher_temp_epochs <= self.epochs:
            raise ValueError(
                f"warmup_teacher_temp_epochs ({self.warmup_teacher_temp_epochs}) must be in "
                f"[0, epochs={self.epochs}]"
            )


def _forward_by_resolution(
    net: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Run `net` once per run of same-shaped consecutive views (global crops, then local crops),
    as DINO's MultiCropWrapper does: one batched pass per resolution."""
    out: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape == views[start].shape:
            end += 1
        y = net(torch.cat(views[start:end]))  # (end - start) * N x D
        out.extend(y.split(views[start].shape[0]))
        start = end
    return out


@METHODS.register("dino")
class DINO(Method):
    """Student (backbone + DINOHead) on every view; EMA teacher on the two global views.

    `views[0]` and `views[1]` are the global crops, any further views are local crops.
    """

    momentum_attr = "teacher_backbone"

    default_recipe = "dino"
    hparams_cls = DINOHParams

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: DINOHParams) -> None:
        super().__init__(backbone, feat_dim, hp)
        self.head = DINOHead(
            feat_dim,
            hp.out_dim,
            hp.proj_hidden_dim,
            hp.bottleneck_dim,
            norm_last_layer=hp.norm_last_layer,
            use_bn=hp.use_bn_in_head,
        )
        self.teacher_backbone = momentum_copy(backbone)
        self.teacher_head = momentum_copy(self.head)
        self.criterion = DINOLoss(
            hp.out_dim,
            teacher_temp=hp.teacher_temp,
            warmup_teacher_temp=hp.warmup_teacher_temp,
            warmup_teacher_temp_epochs=hp.warmup_teacher_temp_epochs,
            total_epochs=hp.epochs,
            student_temp=hp.student_temp,
            center_momentum=hp.center_momentum,
        )
        self.current_momentum = hp.momentum

    def loss(self, x: Inputs) -> torch.Tensor:
        views, epoch = x.views, x.epoch
        student_out = _forward_by_resolution(
            lambda x: self.head(self.backbone(x)), views
        )  # V tensors, N x out_dim
        with torch.no_grad():
            teacher_out = _forward_by_resolution(
                lambda x: self.teacher_head(self.teacher_backbone(x)), views[:2]
            )  # 2 tensors, N x out_dim
        loss = self.criterion(student_out, teacher_out, epoch)
        return loss

    def step_metrics(self, epoch: int) -> Metrics:
        return {
            "momentum": self.current_momentum,
            "teacher_temp": self.criterion.teacher_temperature(epoch),
        }

    def on_before_optimizer_step(self, epoch: int) -> None:
        """Drop the last layer's gradient in the first (reference) epochs: the paper's fix for
        early instability (`freeze_last_layer`)."""
        if epoch < self.hp.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def on_train_step_end(self, progress: float) -> None:
        self.current_momentum = cosine_momentum(self.hp.momentum, progress)
        ema_update(self.teacher_backbone, self.backbone, self.current_momentum)
        ema_update(self.teacher_head, self.head, self.current_momentum)
