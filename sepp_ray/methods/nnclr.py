"""NNCLR (Dwibedi et al., arXiv 2104.14548): the nearest neighbour from a support set of past
projections replaces the anchor, giving positives beyond augmentation.

Semantic positives (`pos_ids`) add to that: a query's positives among the global batch's
predictions are the other view of its own image and of every image in its `pos_ids`.
Cancellation (`cancel_ids`, Huynh et al., arXiv 2011.11765) instead removes those images'
predictions from the query's negatives: the keys are the batch's predictions as in SimCLR, so
the same id masks apply; the support set only chooses the query. The support set stores the
image ids of each projection beside it, so a query is made of its item's images and of its
neighbour's: a key made of any of them is never a negative of it, in every arm (a neighbour
that is an older projection of another image of the batch would otherwise push that image's
prediction away from the image itself).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sepp_ray import dist
from sepp_ray.losses.info_nce import info_nce_loss
from sepp_ray.methods.base import METHODS, Inputs, Method, Metrics
from sepp_ray.methods.identity import RowIds, contrast_masks, mined_of
from sepp_ray.methods.simclr import check_aug_weight
from sepp_ray.models.heads import prediction_mlp, projection_mlp


@dataclass
class NNCLRHParams:
    """NNCLR hyperparameters (paper, sec. 4): 3-layer 2048-d projector to 256 with BN,
    predictor 256 -> 4096 -> 256, temperature 0.1, support set of 98304 projections (the
    driver caps it at the items of an epoch, `fit_hparams`). `aug_weight`: the weight of the
    augmentation pair against mined positives in the multi-positive loss (`info_nce_loss`;
    None = all alike)."""

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 256
    pred_hidden_dim: int = 4096
    temperature: float = 0.1
    queue_size: int = 98304
    aug_weight: float | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        check_aug_weight(self.aug_weight)


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
    queue_images: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: NNCLRHParams) -> None:
        super().__init__(backbone, feat_dim, hp)
        self.projector = projection_mlp(
            feat_dim, hp.proj_hidden_dim, hp.proj_output_dim, 3, last_bn=True
        )
        self.predictor = prediction_mlp(hp.proj_output_dim, hp.pred_hidden_dim, hp.proj_output_dim)
        self.register_buffer("queue", torch.zeros(hp.queue_size, hp.proj_output_dim))
        self.register_buffer("queue_ids", torch.full((hp.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_images", torch.full((hp.queue_size, 2), -1, dtype=torch.long))
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
    def neighbours(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's most cosine-similar filled support-set entry (z itself while it is empty),
        in float32 or wider, and the image ids that entry is made of (N x 2; -1 while empty)."""
        sim = self.support_similarity(z)  # N x Q
        filled = self.queue_ids >= 0  # Q
        sim = sim.masked_fill(~filled[None, :], float("-inf"))
        idx = sim.argmax(dim=1)  # N
        nn_z = self.queue[idx].to(sim.dtype)  # N x D
        own = F.normalize(z.detach().to(sim.dtype), dim=1)
        any_filled = filled.any()  # no host sync on the emptiness test
        return torch.where(any_filled, nn_z, own), torch.where(
            any_filled, self.queue_images[idx], -1
        )

    @torch.no_grad()
    def nearest_neighbour(self, z: torch.Tensor) -> torch.Tensor:
        """Each row's most cosine-similar filled support-set entry (`neighbours`)."""
        return self.neighbours(z)[0]

    @torch.no_grad()
    def _enqueue(self, z: torch.Tensor, rows: RowIds) -> None:
        """Write the newest projections and their ids over the oldest; tensor ops only, so no
        device sync."""
        size = self.queue.shape[0]
        n = min(size, z.shape[0])
        idx = (self.queue_ptr + torch.arange(n, device=z.device)) % size
        self.queue.index_copy_(0, idx, F.normalize(z[-n:].detach(), dim=1).to(self.queue.dtype))
        self.queue_ids.index_copy_(0, idx, rows.ids[-n:])
        self.queue_images.index_copy_(0, idx, rows.images[-n:])
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def _term(
        self, z: torch.Tensor, p_other: torch.Tensor, x: Inputs, rows_global: RowIds
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """InfoNCE of NN(z) against the global batch's predictions of the other view, and its
        counts; the query is made of its item's images and its neighbour's."""
        nn_z, nn_images = self.neighbours(z)  # N x D, N x 2
        rows = RowIds.of(x)
        q_rows = RowIds(rows.ids, torch.cat([rows.images, nn_images], dim=1), rows.groups)
        mined, use = mined_of(x)
        m = contrast_masks(q_rows, rows_global, mined, use)  # N x W*N
        loss = info_nce_loss(
            nn_z,
            dist.gather(p_other),
            m.pos,
            self.hp.temperature,
            m.valid,
            aug_mask=m.own,
            aug_weight=self.hp.aug_weight,
        )
        return loss, m.counts()

    def loss(self, x: Inputs) -> tuple[torch.Tensor, Metrics]:
        z1, z2 = (self.projector(self.backbone(v)) for v in x.views[:2])  # N x D, BN per view
        p1, p2 = self.predictor(z1), self.predictor(z2)
        rows_global = RowIds.of(x).gather()  # W*N rows
        loss1, c1 = self._term(z1, p2, x, rows_global)
        loss2, c2 = self._term(z2, p1, x, rows_global)
        self._enqueue(dist.gather(z1.detach()), rows_global)
        return 0.5 * (loss1 + loss2), {k: c1[k] + c2[k] for k in c1}
