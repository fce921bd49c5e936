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
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sepp_ray.errors import SeppError
from sepp_ray.models.heads import projection_mlp
from sepp_ray.registry import Registry

# How a method may use mined pairs given per image as ids (beyond pair items in the dataset,
# which every method takes): "attract" = extra positives (SePP's multi-positive loss, arXiv
# 2306.16122), "cancel" = removed from the negatives (false-negative cancellation, Huynh et al.,
# WACV 2022, arXiv 2011.11765).
PAIR_USES = ("none", "attract", "cancel")
# What `training_loss` returns besides the loss: device tensors (read by the training step once
# per logging interval, never per step: a read is a host synchronisation) or host floats.
Metrics = dict[str, torch.Tensor | float]
_USE_TEXT = {
    "attract": "mined positives as extra positives (pairs.mode multi_positive or both)",
    "cancel": "mined positives removed from the negatives (pairs.mode cancel)",
}


@dataclass(frozen=True)
class Inputs:
    """One step's batch as a method's `loss` reads it (the fields are `Method`'s arguments)."""

    views: list[torch.Tensor]
    ids: torch.Tensor
    pos_ids: torch.Tensor | None = None
    epoch: int = 0
    labels: torch.Tensor | None = None
    cancel_ids: torch.Tensor | None = None
    view_ids: torch.Tensor | None = None
    groups: torch.Tensor | None = None


# What every method's metrics hold besides its own: the pair counts of
# `sepp_ray.losses.info_nce.pair_counts`, 0 for methods without negatives.
PAIR_COUNTS = ("same_image_negatives", "pairs_used")


class Method(nn.Module):
    """Base SSL method: a backbone plus whatever heads and targets the method needs.

    `training_loss(views, ids, pos_ids, epoch, labels=..., cancel_ids=..., view_ids=...,
    groups=...)`:
      - `views`: augmented batches, each N x C x H x W; views[0] and views[1] are two views of the
        same N images (DINO may pass more: extra local crops).
      - `ids`: N int64 item ids (an original's is its image id; a pair item's is derived). An
        item's two views are each other's positive. Positives are defined by ids, not by batch
        position, so mined semantic pairs, curated pairs and labels all use one code path.
      - `pos_ids`: N x P int64 ids of semantic positives of each image, -1 padded, or None:
        attracted. Only methods with "attract" in `pair_uses` accept it.
      - `labels`: N int64 class labels, -1 = unlabeled, or None. Only `needs_labels` methods
        read them (and refuse None or all -1).
      - `cancel_ids`: N x C int64 ids, -1 padded, or None: these images are removed from the
        negatives. Only methods with "cancel" in `pair_uses` accept it.
      - `view_ids`: N x 2 int64 image ids behind view 1 and view 2 (an original: its id twice;
        a pair item: the anchor's and the positive's), or None = each item is its own image.
        No key made of an image the query is made of is ever a negative (every arm).
      - `groups`: N int64 group ids, -1 = none, or None; only with `pos_ids` or `cancel_ids`:
        items of one group are used as those are (attracted or cancelled), so the positives
        of one anchor are positives of each other.
    A method given a tensor it cannot honour raises SeppError: silently dropping mined pairs
    would make a SePP run equal its baseline.

    A subclass implements `loss` (and `step_metrics` for what it logs besides the loss);
    `training_loss` checks the inputs once for all methods. A contrastive `loss` also returns
    its pair counts (`PAIR_COUNTS`); methods without negatives report 0 for them.
    """

    name: ClassVar[str] = ""
    default_recipe: ClassVar[str] = "simclr"  # augmentation recipe name (sepp_ray.data)
    hparams_cls: ClassVar[type]
    pair_uses: ClassVar[frozenset[str]] = frozenset({"none"})
    needs_labels: ClassVar[bool] = False
    # the attribute holding the momentum / target / teacher backbone (MoCo, BYOL, DINO), if any
    momentum_attr: ClassVar[str | None] = None

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.hp = hp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (N x feat_dim), what evaluation and pair mining embed with."""
        return self.backbone(x)

    def momentum_backbone_or_none(self) -> nn.Module | None:
        """The momentum (target, teacher) backbone, a slowly moving average of the online one;
        None for a method without one."""
        return getattr(self, self.momentum_attr) if self.momentum_attr else None

    def training_loss(
        self,
        views: list[torch.Tensor],
        ids: torch.Tensor,
        pos_ids: torch.Tensor | None = None,
        epoch: int = 0,
        *,
        labels: torch.Tensor | None = None,
        cancel_ids: torch.Tensor | None = None,
        view_ids: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Metrics]:
        """Scalar loss to back-propagate and metrics to log: detached device tensors (never
        `.item()`, which would stall the device every step) or host floats."""
        self._check_inputs(views, ids, pos_ids, cancel_ids)
        _check_identity(ids, view_ids, groups, pos_ids is not None or cancel_ids is not None)
        out = self.loss(Inputs(views, ids, pos_ids, epoch, labels, cancel_ids, view_ids, groups))
        loss, counts = out if isinstance(out, tuple) else (out, {})
        zeros: Metrics = dict.fromkeys(PAIR_COUNTS, 0.0)
        return loss, {"loss": loss.detach(), **zeros, **counts, **self.step_metrics(epoch)}

    def loss(self, x: Inputs) -> torch.Tensor | tuple[torch.Tensor, Metrics]:
        """The method's scalar loss on one step's (already checked) inputs, and for a
        contrastive method its `PAIR_COUNTS` (device tensors)."""
        raise NotImplementedError

    def step_metrics(self, epoch: int) -> Metrics:
        """What the method logs each step besides the loss (e.g. an EMA momentum)."""
        return {}

    @classmethod
    def fit_hparams(cls, hp: Any, n_items: int) -> Any:
        """`hp` adjusted to a dataset of `n_items` training items per epoch (MoCo and NNCLR cap
        their queues); the default changes nothing."""
        return hp

    def on_train_step_end(self, progress: float) -> None:
        """After the optimiser step; `progress` in [0, 1] over training. EMA updates go here."""

    def on_before_optimizer_step(self, epoch: int) -> None:
        """After backward, before the optimiser step: a hook to edit gradients (DINO freezes its
        last layer in the first epoch)."""

    def _check_inputs(
        self,
        views: list[torch.Tensor],
        ids: torch.Tensor,
        pos_ids: torch.Tensor | None = None,
        cancel_ids: torch.Tensor | None = None,
        min_views: int = 2,
    ) -> None:
        """Shapes, and SeppError for mined pairs this method cannot use (see `pair_uses`)."""
        if len(views) < min_views:
            raise ValueError(f"need at least {min_views} views, got {len(views)}")
        n = views[0].shape[0]
        if ids.shape != (n,):
            raise ValueError(f"ids must have shape ({n},), got {tuple(ids.shape)}")
        for use, t in (("attract", pos_ids), ("cancel", cancel_ids)):
            if t is None:
                continue
            check_pair_use(type(self), use)
            if t.dim() != 2 or t.shape[0] != n:
                raise ValueError(f"the {use} ids must be {n} x P, got {tuple(t.shape)}")


def _check_identity(
    ids: torch.Tensor, view_ids: torch.Tensor | None, groups: torch.Tensor | None, mined: bool
) -> None:
    """Shapes of the image ids and groups; groups only beside mined ids (they follow their use)."""
    n = ids.shape[0]
    if view_ids is not None and (view_ids.shape != (n, 2) or view_ids.dtype != torch.long):
        raise ValueError(
            f"view_ids must be {n} x 2 int64 image ids, got {tuple(view_ids.shape)} "
            f"{view_ids.dtype}"
        )
    if groups is None:
        return
    if groups.shape != (n,) or groups.dtype != torch.long:
        raise ValueError(f"groups must be {n} int64 ids, got {tuple(groups.shape)} {groups.dtype}")
    if not mined:
        raise SeppError(
            "groups are used as the mined positives are (attracted or cancelled): pass them "
            "with pos_ids or cancel_ids"
        )


def projector_of(feat_dim: int, hp: Any, last_bn: bool = False) -> nn.Module:
    """The projection MLP a method's hyperparameters describe (`proj_hidden_dim`,
    `proj_output_dim`, `proj_layers`)."""
    return projection_mlp(
        feat_dim, hp.proj_hidden_dim, hp.proj_output_dim, hp.proj_layers, last_bn=last_bn
    )


def _named_method(name: str, cls: type[Method]) -> None:
    """A registered class knows its name (checkpoints and logs record it) and its hyperparameter
    dataclass (`make_hparams` builds it)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"method {name!r} must be a Method subclass, got {cls!r}")
    if not hasattr(cls, "hparams_cls"):
        raise TypeError(f"{cls.__name__} must set hparams_cls")
    cls.name = name


# Every SSL method by name (timm-style registry): `@METHODS.register("simclr")` on the class.
METHODS: Registry[type[Method]] = Registry("method", on_add=_named_method)


def check_pair_use(method: str | type[Method], use: str) -> None:
    """SeppError unless `method` (a registered name or class) can use mined pairs as `use`
    (one of PAIR_USES), naming the methods that can."""
    if use not in PAIR_USES:
        raise SeppError(f"pair use must be one of {list(PAIR_USES)}, got {use!r}")
    cls = METHODS.get(method) if isinstance(method, str) else method
    if use in cls.pair_uses:
        return
    able = [n for n in METHODS if use in METHODS.get(n).pair_uses]
    raise SeppError(
        f"method {cls.name or cls.__name__!r} cannot use {_USE_TEXT[use]}: it would silently "
        f"train the plain method. Methods that can: {able}; any method takes pairs as extra "
        "items (pairs.mode=dataset)"
    )


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
