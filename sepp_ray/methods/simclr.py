"""SimCLR (Chen et al., arXiv 2002.05709) with positives from ids (multi-positive, SePP-CID)
and false-negative cancellation (Huynh et al., arXiv 2011.11765)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sepp_ray import dist
from sepp_ray.losses.info_nce import info_nce_loss, positive_mask, self_mask
from sepp_ray.methods.base import METHODS, Inputs, Method, projector_of


@dataclass
class SimCLRHParams:
    """SimCLR hyperparameters.

    The paper uses a 2-layer MLP 2048 -> 128 and temperature 0.1 for ImageNet at batch 4096,
    0.5 for CIFAR-10 (appendix B.9). The default 0.2 sits between: it is what solo-learn uses on
    CIFAR and ImageNet-100 at batch 256-512, the batch sizes this project runs at, and the
    multi-positive loss (several positives per anchor) tolerates a sharper softmax than 0.5.
    """

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 128
    proj_layers: int = 2
    temperature: float = 0.2

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def contrastive_loss(
    z: torch.Tensor,
    ids: torch.Tensor,
    pos_ids: torch.Tensor | None,
    temperature: float,
    labels: torch.Tensor | None = None,
    cancel_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """NT-Xent over all views of the global batch, every mask built from ids.

    z: V*N x D (views stacked view-major), ids: N. Every row is a query against every gathered
    row but itself. Positives: keys with the query's id, or one of its `pos_ids` (N x P), or
    its label (`labels`, N, -1 = none: SupCon, arXiv 2004.11362). `cancel_ids` (N x C): keys of
    those images leave the query's negatives (false-negative cancellation, arXiv 2011.11765).
    """
    n_views = z.shape[0] // ids.shape[0]
    q_ids = ids.repeat(n_views)  # V*N
    keys = dist.gather(z)  # W*V*N x D
    key_ids = dist.gather(q_ids)  # W*V*N
    valid = self_mask(z.shape[0], keys.shape[0], dist.global_offset(z.shape[0]), z.device)
    pos = positive_mask(q_ids, key_ids, _per_view(pos_ids, n_views))  # V*N x W*V*N
    if labels is not None:
        q_labels = labels.repeat(n_views)  # V*N
        pos |= positive_mask(q_labels, dist.gather(q_labels))
    cancel = None
    if cancel_ids is not None:
        cancel = positive_mask(q_ids, key_ids, _per_view(cancel_ids, n_views))  # V*N x W*V*N
    return info_nce_loss(z, keys, pos, temperature, valid, cancel)


def _per_view(x: torch.Tensor | None, n_views: int) -> torch.Tensor | None:
    """N x P per-image ids -> V*N x P, one block per view (view-major, as the queries)."""
    return None if x is None else x.repeat(n_views, 1)


@METHODS.register("simclr")
class SimCLR(Method):
    """Both views of every image in the global batch are keys; a query's positives are the keys
    with its id (its other view) or one of its semantic positive ids (`pos_ids`, "attract");
    `cancel_ids` ("cancel") are keys taken out of its negatives."""

    default_recipe = "simclr"
    hparams_cls = SimCLRHParams
    pair_uses = frozenset({"none", "attract", "cancel"})

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: SimCLRHParams) -> None:
        super().__init__(backbone, feat_dim, hp)
        self.projector = projector_of(feat_dim, hp)

    def loss(self, x: Inputs) -> torch.Tensor:
        # one backbone pass over both views: BN statistics span the whole 2N batch, as in SimCLR
        z = self.projector(self.backbone(torch.cat(x.views[:2])))  # 2N x D
        loss = contrastive_loss(z, x.ids, x.pos_ids, self.hp.temperature, cancel_ids=x.cancel_ids)
        return loss
