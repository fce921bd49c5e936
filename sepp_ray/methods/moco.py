"""MoCo-v2 (Chen et al., arXiv 2003.04297; MoCo arXiv 1911.05722) with an id-aware queue.

The queue stores keys AND their image ids, so positives and cancelled negatives are masks from
ids over the batch's keys and the queue alike. Plain MoCo has one positive per query, the key of
its other view; queued keys of the same image are negatives, as in the paper (the option
`queue_id_positives` makes them positives). A query's semantic positives (`pos_ids`, SePP-CID,
arXiv 2306.16122) count wherever they are, in the batch or in the queue: that reach beyond the
batch is what the queue gives SePP. `cancel_ids` remove those images, and older keys of the
query's own image, from its negatives (Huynh et al., arXiv 2011.11765).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sepp_ray import dist
from sepp_ray.losses.info_nce import info_nce_loss, positive_mask
from sepp_ray.methods.base import (
    METHODS,
    Inputs,
    Method,
    ema_update,
    momentum_copy,
)
from sepp_ray.models.heads import projection_mlp


@dataclass
class MoCoV2HParams:
    """MoCo-v2 hyperparameters, the paper's ImageNet values.

    2-layer MLP head (2048 hidden, ReLU, no BN) to 128-d, temperature 0.2, momentum 0.999,
    queue 65536. On CIFAR use momentum 0.99 and queue 4096 (50k images: a 65536 queue would
    hold keys many steps stale); the driver caps the queue at the items of an epoch
    (`fit_hparams`). `symmetric=True` uses both views as queries (solo-learn's MoCo-v2+;
    MoCo-v3), which doubles the signal per step; False is the paper's asymmetric loss.
    `queue_id_positives=True` makes queued keys of the query's own image positives too (older
    keys of the same image; up to 3 positives per query were measured); False, the default,
    is MoCo's one positive per query (arXiv 1911.05722, eq. 1).
    """

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 128
    temperature: float = 0.2
    momentum: float = 0.999
    queue_size: int = 65536
    symmetric: bool = True
    queue_id_positives: bool = False

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")


@METHODS.register("mocov2")
class MoCoV2(Method):
    """Query encoder + momentum key encoder + a FIFO queue of (key, id).

    Keys for each query: the global batch's keys (its own other view is one; other images' are
    extra negatives, as in MoCo-v3) then the queue. Positives: the batch key of the same id, a
    `pos_ids` entry anywhere, and with `queue_id_positives` queued keys of the same id.
    Unfilled queue slots (id -1) are left out of the softmax. No shuffle-BN: use SyncBN or
    per-rank BN, as solo-learn does.
    """

    default_recipe = "mocov2"
    hparams_cls = MoCoV2HParams
    pair_uses = frozenset({"none", "attract", "cancel"})

    queue: torch.Tensor
    queue_ids: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, backbone: nn.Module, feat_dim: int, hp: MoCoV2HParams) -> None:
        super().__init__(backbone, feat_dim, hp)
        self.projector = projection_mlp(
            feat_dim, hp.proj_hidden_dim, hp.proj_output_dim, 2, batch_norm=False
        )
        self.momentum_backbone = momentum_copy(backbone)
        self.momentum_projector = momentum_copy(self.projector)
        self.register_buffer("queue", torch.zeros(hp.queue_size, hp.proj_output_dim))
        self.register_buffer("queue_ids", torch.full((hp.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.momentum_projector(self.momentum_backbone(x)), dim=1)  # N x D

    @classmethod
    def fit_hparams(cls, hp: MoCoV2HParams, n_items: int) -> MoCoV2HParams:
        """Queue no longer than an epoch's items: a longer one holds older keys of every image
        of the batch (negatives of themselves, or extra positives with queue_id_positives)."""
        return replace(hp, queue_size=min(hp.queue_size, max(n_items, 0)))

    def _loss(
        self,
        q: torch.Tensor,
        k_global: torch.Tensor,
        ids: torch.Tensor,
        ids_global: torch.Tensor,
        pos_ids: torch.Tensor | None,
        cancel_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        keys = torch.cat([k_global, self.queue])  # (W*N + K) x D
        key_ids = torch.cat([ids_global, self.queue_ids])  # W*N + K
        valid = (key_ids >= 0)[None, :].expand(q.shape[0], -1)  # N x (W*N + K)
        pos = torch.cat(
            [
                positive_mask(ids, ids_global, pos_ids),  # N x W*N
                positive_mask(ids, self.queue_ids, pos_ids, self.hp.queue_id_positives),  # N x K
            ],
            dim=1,
        )
        cancel = None if cancel_ids is None else positive_mask(ids, key_ids, cancel_ids)
        return info_nce_loss(q, keys, pos, self.hp.temperature, valid, cancel)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, key_ids: torch.Tensor) -> None:
        """Write the newest keys over the oldest; tensor ops only, so no device sync."""
        size = self.queue.shape[0]
        if size == 0:
            return
        keys, key_ids = keys[-size:], key_ids[-size:]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ids.index_copy_(0, idx, key_ids)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def loss(self, x: Inputs) -> torch.Tensor:
        views, ids, pos_ids, cancel_ids = x.views, x.ids, x.pos_ids, x.cancel_ids
        ids_global = dist.gather(ids)  # W*N
        k1 = dist.gather(self._keys(views[0]))  # W*N x D
        k2 = dist.gather(self._keys(views[1]))
        q1 = self.projector(self.backbone(views[0]))  # N x D
        if self.hp.symmetric:
            q2 = self.projector(self.backbone(views[1]))
            loss = 0.5 * (
                self._loss(q1, k2, ids, ids_global, pos_ids, cancel_ids)
                + self._loss(q2, k1, ids, ids_global, pos_ids, cancel_ids)
            )
            self._enqueue(torch.cat([k1, k2]), ids_global.repeat(2))
        else:
            loss = self._loss(q1, k2, ids, ids_global, pos_ids, cancel_ids)
            self._enqueue(k2, ids_global)
        return loss

    def on_train_step_end(self, progress: float) -> None:
        """Constant momentum, as in MoCo (no schedule)."""
        ema_update(self.momentum_backbone, self.backbone, self.hp.momentum)
        ema_update(self.momentum_projector, self.projector, self.hp.momentum)
