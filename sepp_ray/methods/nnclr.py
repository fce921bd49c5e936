"""NNCLR (Dwibedi et al., arXiv 2104.14548): the nearest neighbour from a support set of past
projections replaces the anchor, giving positives beyond augmentation.

Semantic positives (`pos_ids`) add to that: a query's positives among the global batch's
predictions are the other view of its own image and of every image in its `pos_ids`.
Cancellation (`cancel_ids`, Huynh et al., arXiv 2011.11765) instead removes those images'
predictions from the query's negatives: the keys are the batch's predictions as in SimCLR, so
the same id masks apply; the support set only chooses the query.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sepp_ray import dist
from sepp_ray.losses.info_nce import info_nce_loss, positive_mask
from sepp_ray.methods.base import METHODS, Inputs, Method
from sepp_ray.models.heads import prediction_mlp, projection_mlp


@dataclass
class NNCLRHParams:
    """NNCLR hyperparameters (paper, sec. 4): 3-layer 2048-d projector to 256 with BN,
    predictor 256 -> 4096 -> 256, temperature 0.1, support set of 98304 projections (the
    driver caps it at the items of an epoch, `fit_hparams`)."""

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 256
    pred_hidden_dim: int = 4096
    temperature: float = 0.1
    queue_size: int = 98304

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")


@METHODS.register("nnclr")
class NNCLR(Method):
    """loss = (InfoNCE(NN(z1), p2) + InfoNCE(NN(z2), p1)) / 2, keys = the global batch's p.

    NN(z) is looked up without gradient, so the gradient reaches the network through the
    predictions p (as in the authors' and solo-learn's code). Until the support set holds any
    projection (the first step), NN(z) falls back to z itself, i.e. plain SimCLR.
    """

    default_recipe = "byol"
    hparams_cls = NNCLRHParams
    pair_uses = frozenset({"none", "attract", "cancel"})

    queue: torch.Tensor
    queue_ids: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: NNCLRHParams) -> None:
        super().__init__(backbone, feat_dim, hp)
        self.projector = projection_mlp(
            feat_dim, hp.proj_hidden_dim, hp.proj_output_dim, 3, last_bn=True
        )
        self.predictor = prediction_mlp(hp.proj_output_dim, hp.pred_hidden_dim, hp.proj_output_dim)
        self.register_buffer("queue", torch.zeros(hp.queue_size, hp.proj_output_dim))
        self.register_buffer("queue_ids", torch.full((hp.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @classmethod
    def fit_hparams(cls, hp: NNCLRHParams, n_items: int) -> NNCLRHParams:
        """Support set no longer than an epoch's items: a longer one holds a stale projection
        of every image of the batch, its likeliest nearest neighbour."""
        return replace(hp, queue_size=min(hp.queue_size, max(n_items, 1)))

    @torch.no_grad()
    def support_similarity(self, z: torch.Tensor) -> torch.Tensor:
        """N x Q cosine similarity of each row to the support set, in fp32 even under
        autocast: bf16 rounding (~4e-3) would reorder near neighbours."""
        dtype = torch.promote_types(z.dtype, torch.float32)  # float64 stays float64
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.detach().to(dtype), dim=1)  # N x D
            return z @ self.queue.to(dtype).T  # N x Q

    @torch.no_grad()
    def nearest_neighbour(self, z: torch.Tensor) -> torch.Tensor:
        """Each row's most cosine-similar filled support-set entry (z itself while it is empty),
        in float32 or wider."""
        sim = self.support_similarity(z)  # N x Q
        filled = self.queue_ids >= 0  # Q
        sim = sim.masked_fill(~filled[None, :], float("-inf"))
        nn_z = self.queue[sim.argmax(dim=1)].to(sim.dtype)  # N x D
        own = F.normalize(z.detach().to(sim.dtype), dim=1)
        return torch.where(filled.any(), nn_z, own)  # no host sync on the emptiness test

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor, z_ids: torch.Tensor) -> None:
        """Write the newest projections over the oldest; tensor ops only, so no device sync."""
        size = self.queue.shape[0]
        z, z_ids = z[-size:], z_ids[-size:]
        idx = (self.queue_ptr + torch.arange(z.shape[0], device=z.device)) % size
        self.queue.index_copy_(0, idx, F.normalize(z.detach(), dim=1).to(self.queue.dtype))
        self.queue_ids.index_copy_(0, idx, z_ids)
        self.queue_ptr.copy_((self.queue_ptr + z.shape[0]) % size)

    def loss(self, x: Inputs) -> torch.Tensor:
        ids, pos_ids, cancel_ids = x.ids, x.pos_ids, x.cancel_ids
        z1, z2 = (self.projector(self.backbone(v)) for v in x.views[:2])  # N x D, BN per view
        p1, p2 = self.predictor(z1), self.predictor(z2)
        nn1, nn2 = self.nearest_neighbour(z1), self.nearest_neighbour(z2)
        ids_global = dist.gather(ids)  # W*N
        pos = positive_mask(ids, ids_global, pos_ids)  # N x W*N
        cancel = None if cancel_ids is None else positive_mask(ids, ids_global, cancel_ids)
        t = self.hp.temperature
        loss = 0.5 * (
            info_nce_loss(nn1, dist.gather(p2), pos, t, cancel_mask=cancel)
            + info_nce_loss(nn2, dist.gather(p1), pos, t, cancel_mask=cancel)
        )
        self._enqueue(dist.gather(z1.detach()), ids_global)
        return loss
