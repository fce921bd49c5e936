"""MoCo-v2 (Chen et al., arXiv 2003.04297; MoCo arXiv 1911.05722) with an id-aware queue.

The queue stores keys AND the identity of their items (item id, the two image ids behind its
views, its group), so positives and cancelled negatives are masks from ids over the batch's
keys and the queue alike. Plain MoCo has one positive per query, the key of its other view; a
queued key made of an image the query is made of (an older key of the same image, or of a pair
item sharing it) is never a negative, in every arm (the option `queue_id_positives` makes the
query's own item's older keys positives instead). A query's semantic positives (`pos_ids`,
SePP-CID, arXiv 2306.16122) and its group count wherever they are, in the batch or in the
queue: that reach beyond the batch is what the queue gives SePP. `cancel_ids` remove those
images (and only those) from its negatives (Huynh et al., arXiv 2011.11765).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sepp_ray import dist
from sepp_ray.losses.info_nce import info_nce_loss
from sepp_ray.methods.base import (
    METHODS,
    Inputs,
    Method,
    Metrics,
    ema_update,
    momentum_copy,
)
from sepp_ray.methods.identity import ContrastMasks, RowIds, contrast_masks, mined_of
from sepp_ray.methods.simclr import check_aug_weight
from sepp_ray.models.heads import projection_mlp


@dataclass
class MoCoV2HParams:
    """MoCo-v2 hyperparameters, the paper's ImageNet values.

    2-layer MLP head (2048 hidden, ReLU, no BN) to 128-d, temperature 0.2, momentum 0.999,
    queue 65536. On CIFAR use momentum 0.99 and queue 4096 (50k images: a 65536 queue would
    hold keys many steps stale); the driver caps the queue at the items of an epoch
    (`fit_hparams`). `symmetric=True` uses both views as queries (solo-learn's MoCo-v2+;
    MoCo-v3), which doubles the signal per step; False is the paper's asymmetric loss.
    `queue_id_positives=True` makes queued keys of the query's own item positives too (older
    keys of the same image; up to 3 positives per query were measured); False, the default,
    is MoCo's one positive per query (arXiv 1911.05722, eq. 1), older keys of its images
    being left out of the negatives. `aug_weight`: the weight of the augmentation pair against
    mined positives in the multi-positive loss (`info_nce_loss`; None = all alike).
    """

    proj_hidden_dim: int = 2048
    proj_output_dim: int = 128
    temperature: float = 0.2
    momentum: float = 0.999
    queue_size: int = 65536
    symmetric: bool = True
    queue_id_positives: bool = False
    aug_weight: float | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        check_aug_weight(self.aug_weight)


@METHODS.register("mocov2")
class MoCoV2(Method):
    """Query encoder + momentum key encoder + a FIFO queue of (key, item id, image ids, group).

    Keys for each query: the global batch's keys (its own other view is one; other images' are
    extra negatives, as in MoCo-v3) then the queue. Positives: the batch key of the same id, a
    `pos_ids` entry or group member anywhere, and with `queue_id_positives` queued keys of the
    same id. Keys sharing an image with the query and unfilled queue slots (id -1) are left out
    of the softmax. No shuffle-BN: use SyncBN or per-rank BN, as solo-learn does.
    """

    momentum_attr = "momentum_backbone"

    default_recipe = "mocov2"
    hparams_cls = MoCoV2HParams
    pair_uses = frozenset({"none", "attract", "cancel"})

    queue: torch.Tensor
    queue_ids: torch.Tensor
    queue_images: torch.Tensor
    queue_groups: torch.Tensor
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
        self.register_buffer("queue_images", torch.full((hp.queue_size, 2), -1, dtype=torch.long))
        self.register_buffer("queue_groups", torch.full((hp.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.momentum_projector(self.momentum_backbone(x)), dim=1)  # N x D

    @classmethod
    def fit_hparams(cls, hp: MoCoV2HParams, n_items: int) -> MoCoV2HParams:
        """Queue no longer than an epoch's items: a longer one holds older keys of every image
        of the batch (slots lost to the same-image mask, or extra positives with
        queue_id_positives)."""
        return replace(hp, queue_size=min(hp.queue_size, max(n_items, 0)))

    def _masks(self, x: Inputs, rows_global: RowIds) -> ContrastMasks:
        """Masks of this rank's N queries against the global batch's keys then the queue."""
        queue_rows = RowIds(self.queue_ids, self.queue_images, self.queue_groups)
        key_rows = rows_global.cat(queue_rows)  # W*N + K rows
        n, wn, size = x.ids.shape[0], rows_global.ids.shape[0], self.queue.shape[0]
        valid = (key_rows.ids >= 0)[None, :].expand(n, -1)  # N x (W*N + K)
        own_keys = torch.cat(  # the item's queued keys are positives only with the option
            [
                torch.ones(wn, dtype=torch.bool, device=x.ids.device),
                torch.full((size,), self.hp.queue_id_positives, device=x.ids.device),
            ]
        )
        mined, use = mined_of(x)
        return contrast_masks(RowIds.of(x), key_rows, mined, use, valid, own_keys)

    def _nce(self, q: torch.Tensor, k_global: torch.Tensor, m: ContrastMasks) -> torch.Tensor:
        keys = torch.cat([k_global, self.queue])  # (W*N + K) x D
        return info_nce_loss(
            q,
            keys,
            m.pos,
            self.hp.temperature,
            m.valid,
            aug_mask=m.own,
            aug_weight=self.hp.aug_weight,
        )

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, rows: RowIds) -> None:
        """Write the newest keys and their rows over the oldest; tensor ops only, no sync."""
        size = self.queue.shape[0]
        if size == 0:
            return
        n = min(size, keys.shape[0])
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue.index_copy_(0, idx, keys[-n:].to(self.queue.dtype))
        self.queue_ids.index_copy_(0, idx, rows.ids[-n:])
        self.queue_images.index_copy_(0, idx, rows.images[-n:])
        self.queue_groups.index_copy_(0, idx, rows.groups[-n:])
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def loss(self, x: Inputs) -> tuple[torch.Tensor, Metrics]:
        views = x.views
        rows_global = RowIds.of(x).gather()  # W*N rows
        k1 = dist.gather(self._keys(views[0]))  # W*N x D
        k2 = dist.gather(self._keys(views[1]))
        masks = self._masks(x, rows_global)  # the same ids for both views' queries
        counts = masks.counts()
        q1 = self.projector(self.backbone(views[0]))  # N x D
        if self.hp.symmetric:
            q2 = self.projector(self.backbone(views[1]))
            loss = 0.5 * (self._nce(q1, k2, masks) + self._nce(q2, k1, masks))
            counts = {k: 2 * v for k, v in counts.items()}  # two queries per item
            self._enqueue(torch.cat([k1, k2]), rows_global.repeat(2))
        else:
            loss = self._nce(q1, k2, masks)
            self._enqueue(k2, rows_global)
        return loss, {**counts}

    def on_train_step_end(self, progress: float) -> None:
        """Constant momentum, as in MoCo (no schedule)."""
        ema_update(self.momentum_backbone, self.backbone, self.hp.momentum)
        ema_update(self.momentum_projector, self.projector, self.hp.momentum)
