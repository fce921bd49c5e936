"""SimCLR (Chen et al., arXiv 2002.05709) with positives from ids (multi-positive, SePP-CID)
and false-negative cancellation (Huynh et al., arXiv 2011.11765)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sepp_ray import dist
from sepp_ray.losses.info_nce import info_nce_loss, positive_mask, self_mask
from sepp_ray.methods.base import METHODS, Inputs, Method, Metrics, projector_of
from sepp_ray.methods.identity import RowIds, contrast_masks, mined_of


@dataclass
class SimCLRHParams:
    """SimCLR hyperparameters.

    The paper uses a 2-layer MLP 2048 -> 128 and temperature 0.1 for ImageNet at batch 4096,
    0.5 for CIFAR-10 (appendix B.9). The default 0.2 sits between: it is what solo-learn uses on
    CIFAR and ImageNet-100 at batch 256-512, the batch sizes this project runs at, and the
    multi-positive loss (several positives per anchor) tolerates a sharper softmax than 0.5.
    `aug_weight`: the weight of an anchor's augmentation pair against its mined positives in
    the multi-positive loss (`info_nce_loss`); None, the default, weighs every positive alike.
    """

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 128
    proj_layers: int = 2
    temperature: float = 0.2
    aug_weight: float | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        check_aug_weight(self.aug_weight)


def check_aug_weight(w: float | None) -> None:
    """ValueError unless `w` is None or in [0, 1] (a hyperparameter check)."""
    if w is not None and not 0.0 <= w <= 1.0:
        raise ValueError(f"aug_weight must be in [0, 1] or None, got {w}")


def contrastive_loss(
    z: torch.Tensor,
    x: Inputs,
    temperature: float,
    aug_weight: float | None = None,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """NT-Xent over all views of the global batch, every mask built from ids, and its counts.

    z: V*N x D (views stacked view-major), x: the step's inputs (N images). Every row is a
    query against every gathered row but itself. Positives: keys of its item, or of one of
    its mined ids / its group (`x.pos_ids`, "attract"), or of its label (`labels`, N, -1 =
    none: SupCon, arXiv 2004.11362). Mined ids given as `x.cancel_ids` leave the query's
    negatives instead (false-negative cancellation, arXiv 2011.11765), and so do keys made of
    an image the query is made of (`x.view_ids`), in every arm.
    """
    n_views = z.shape[0] // x.ids.shape[0]
    q_rows = RowIds.of(x).repeat(n_views)  # V*N rows
    k_rows = q_rows.gather()  # W*V*N rows
    keys = dist.gather(z)  # W*V*N x D
    valid = self_mask(z.shape[0], keys.shape[0], dist.global_offset(z.shape[0]), z.device)
    extra = None
    if labels is not None:
        q_labels = labels.repeat(n_views)  # V*N
        extra = positive_mask(q_labels, dist.gather(q_labels))  # V*N x W*V*N
    mined, use = mined_of(x)
    masks = contrast_masks(q_rows, k_rows, _per_view(mined, n_views), use, valid, None, extra)
    loss = info_nce_loss(
        z, keys, masks.pos, temperature, masks.valid, aug_mask=masks.own, aug_weight=aug_weight
    )
    return loss, {**masks.counts()}


def _per_view(x: torch.Tensor | None, n_views: int) -> torch.Tensor | None:
    """N x P per-image ids -> V*N x P, one block per view (view-major, as the queries)."""
    return None if x is None else x.repeat(n_views, 1)


@METHODS.register("simclr")
class SimCLR(Method):
    """Both views of every image in the global batch are keys; a query's positives are the keys
    with its id (its other view) or one of its semantic positive ids (`pos_ids`, "attract");
    `cancel_ids` ("cancel") are keys taken out of its negatives, and so are keys sharing an
    image with it (`view_ids`)."""

    default_recipe = "simclr"
    hparams_cls = SimCLRHParams
    pair_uses = frozenset({"none", "attract", "cancel"})

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: SimCLRHParams) -> None:
        super().__init__(backbone, feat_dim, hp)
        self.projector = projector_of(feat_dim, hp)

    def loss(self, x: Inputs) -> tuple[torch.Tensor, Metrics]:
        # one backbone pass over both views: BN statistics span the whole 2N batch, as in SimCLR
        z = self.projector(self.backbone(torch.cat(x.views[:2])))  # 2N x D
        return contrastive_loss(z, x, self.hp.temperature, self.hp.aug_weight)
