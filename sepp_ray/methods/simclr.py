"""SimCLR (Chen et al., arXiv 2002.05709) with positives from ids (multi-positive, SePP-CID)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sepp_ray import dist
from sepp_ray.losses.info_nce import info_nce_loss, positive_mask, self_mask
from sepp_ray.methods.base import Method, register_method
from sepp_ray.models.heads import projection_mlp


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
) -> torch.Tensor:
    """NT-Xent over all views of the global batch; positives = same id or a listed positive.

    z: V*N x D (views stacked view-major), ids: N, pos_ids: N x P or None. Every row is a query
    against every gathered row but itself.
    """
    n_views = z.shape[0] // ids.shape[0]
    q_ids = ids.repeat(n_views)  # V*N
    q_pos = None if pos_ids is None else pos_ids.repeat(n_views, 1)  # V*N x P
    keys = dist.gather(z)  # W*V*N x D
    key_ids = dist.gather(q_ids)  # W*V*N
    valid = self_mask(z.shape[0], keys.shape[0], dist.global_offset(z.shape[0]), z.device)
    pos = positive_mask(q_ids, key_ids, q_pos)  # V*N x W*V*N
    return info_nce_loss(z, keys, pos, temperature, valid)


@register_method("simclr")
class SimCLR(Method):
    """Both views of every image in the global batch are keys; a query's positives are the keys
    with its id (its other view) or one of its semantic positive ids (`pos_ids`)."""

    default_recipe = "simclr"
    hparams_cls = SimCLRHParams
    supports_multi_positive = True

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: SimCLRHParams) -> None:
        super().__init__(backbone, feat_dim, hp)
        self.projector = projection_mlp(
            feat_dim, hp.proj_hidden_dim, hp.proj_output_dim, hp.proj_layers
        )

    def training_loss(
        self,
        views: list[torch.Tensor],
        ids: torch.Tensor,
        pos_ids: torch.Tensor | None = None,
        epoch: int = 0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        self._check_views(views, ids)
        # one backbone pass over both views: BN statistics span the whole 2N batch, as in SimCLR
        z = self.projector(self.backbone(torch.cat(views[:2])))  # 2N x D
        loss = contrastive_loss(z, ids, pos_ids, self.hp.temperature)
        return loss, {"loss": loss.item()}
