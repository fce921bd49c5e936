"""The interface every SSL method implements, and the momentum-network helpers they share.

A method is a plain `nn.Module`: it knows nothing of Ray or of devices (no `.cuda()`), and it
talks across ranks only through `sepp_ray.dist`. The training driver calls `training_loss` once
per step and `on_train_step_end` after the optimiser step.

Optimise only `p for p in method.parameters() if p.requires_grad`: momentum (target) networks are
submodules whose parameters have `requires_grad=False`, so checkpoints hold them too.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
from torch import nn


class Method(nn.Module):
    """Base SSL method: a backbone plus whatever heads and targets the method needs.

    `training_loss(views, ids, pos_ids, epoch)`:
      - `views`: augmented batches, each N x C x H x W; views[0] and views[1] are two views of the
        same N images (DINO may pass more: extra local crops).
      - `ids`: N int64 image ids. Positives are defined by ids, not by batch position, so mined
        semantic pairs, curated pairs and labels all use one code path.
      - `pos_ids`: N x P int64 ids of semantic positives of each image, -1 padded, or None.
        Only methods with `supports_multi_positive = True` use it; the others ignore it.
    """

    name: ClassVar[str] = ""
    default_recipe: ClassVar[str] = "simclr"  # augmentation recipe name (sepp_ray.data)
    hparams_cls: ClassVar[type]
    supports_multi_positive: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.hp = hp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (N x feat_dim), what evaluation and pair mining embed with."""
        return self.backbone(x)

    def training_loss(
        self,
        views: list[torch.Tensor],
        ids: torch.Tensor,
        pos_ids: torch.Tensor | None = None,
        epoch: int = 0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to back-propagate and float metrics to log."""
        raise NotImplementedError

    def on_train_step_end(self, progress: float) -> None:
        """After the optimiser step; `progress` in [0, 1] over training. EMA updates go here."""

    def on_before_optimizer_step(self, epoch: int) -> None:
        """After backward, before the optimiser step: a hook to edit gradients (DINO freezes its
        last layer in the first epoch)."""

    @staticmethod
    def _check_views(views: list[torch.Tensor], ids: torch.Tensor, min_views: int = 2) -> None:
        if len(views) < min_views:
            raise ValueError(f"need at least {min_views} views, got {len(views)}")
        if ids.shape != (views[0].shape[0],):
            raise ValueError(f"ids must have shape ({views[0].shape[0]},), got {tuple(ids.shape)}")


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy: the momentum / target network of MoCo, BYOL and DINO."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad = False
    return target


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule (arXiv 2006.07733 eq. 3 footnote): base -> 1 along a half cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * online, parameter by parameter."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Any:
    """Class decorator: make a `Method` subclass creatable by `name` (timm-style registry)."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        if not hasattr(cls, "hparams_cls"):
            raise TypeError(f"{cls.__name__} must set hparams_cls")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap
