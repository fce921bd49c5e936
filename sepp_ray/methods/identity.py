"""Who each row of a contrastive batch is, and the InfoNCE masks built from that alone.

Positives are data, not position (solo-learn's `pos_mask`): a key is a query's positive because
of ids (the query's own item, a mined positive, its group, its class), and a key is never a
negative when it is made of an image the query is made of. A row knows its item id, the two
image ids behind its item's views and its group; one gather brings every rank's rows, and a
queue stores them beside its keys, so the same masks hold in the batch, across ranks and in a
queue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sepp_ray import dist
from sepp_ray.losses.info_nce import pair_counts, positive_mask, resolve_masks, same_image_mask
from sepp_ray.methods.base import Inputs


@dataclass(frozen=True)
class RowIds:
    """Identity of R rows: item `ids` (R; an item's views are each other's augmentation pair),
    `images` (R x 2: the image ids behind view 1 and view 2, -1 = none) and `groups` (R, -1 =
    none: rows of one group are one class of the batch)."""

    ids: Tensor
    images: Tensor
    groups: Tensor

    @classmethod
    def of(cls, x: Inputs) -> RowIds:
        """The rows of a step's inputs; no `view_ids` means each item is its own image."""
        ids = x.ids
        images = ids[:, None].expand(-1, 2) if x.view_ids is None else x.view_ids  # N x 2
        groups = torch.full_like(ids, -1) if x.groups is None else x.groups  # N
        return cls(ids, images.to(ids.device), groups.to(ids.device))

    def repeat(self, n: int) -> RowIds:
        """The rows n times over, block after block (views stacked view-major)."""
        return RowIds(self.ids.repeat(n), self.images.repeat(n, 1), self.groups.repeat(n))

    def gather(self) -> RowIds:
        """Every rank's rows in rank order (as `dist.gather` stacks keys), in one collective."""
        packed = torch.cat([self.ids[:, None], self.images, self.groups[:, None]], dim=1)  # R x 4
        g = dist.gather(packed)  # W*R x 4
        return RowIds(g[:, 0], g[:, 1:3], g[:, 3])

    def cat(self, other: RowIds) -> RowIds:
        """These rows, then `other`'s (the batch's keys, then a queue's)."""
        return RowIds(
            torch.cat([self.ids, other.ids]),
            torch.cat([self.images, other.images]),
            torch.cat([self.groups, other.groups]),
        )


def mined_of(x: Inputs) -> tuple[Tensor | None, str]:
    """The mined ids of a step (N x P, -1 padded) and their use: "attract", "cancel", "none"."""
    if x.pos_ids is not None:
        return x.pos_ids, "attract"
    if x.cancel_ids is not None:
        return x.cancel_ids, "cancel"
    return None, "none"


@dataclass(frozen=True)
class ContrastMasks:
    """The N x M masks of one query-versus-keys InfoNCE term.

    `pos` and `valid` are what the softmax uses (`resolve_masks`: pass them to
    `info_nce_loss`); `own` marks the query's augmentation pair (its aug_mask), `same` the keys
    sharing one of its images, `mined` its mined pairs (None without mined ids) and
    `candidates` the keys it may meet at all (None = all).
    """

    pos: Tensor
    valid: Tensor | None
    own: Tensor
    same: Tensor
    mined: Tensor | None
    candidates: Tensor | None

    def counts(self) -> dict[str, Tensor]:
        """`same_image_negatives` and `pairs_used` of one loss term (`pair_counts`)."""
        return pair_counts(self.same, self.pos, self.valid, self.mined, self.candidates)


def contrast_masks(
    q: RowIds,
    k: RowIds,
    mined_ids: Tensor | None,
    use: str,
    valid: Tensor | None = None,
    own_keys: Tensor | None = None,
    extra_pos: Tensor | None = None,
) -> ContrastMasks:
    """Masks of N query rows `q` against M key rows `k`, from ids alone.

    Positives: keys of the query's own item (only where `own_keys`, bool M, allows: MoCo's
    queue), `extra_pos` (N x M: class labels), and with use "attract" its mined pairs: keys
    whose item id is one of `mined_ids` (N x P) or whose group is the query's. With use
    "cancel" those mined pairs leave the negatives instead. In every arm, keys sharing an image
    with the query leave the negatives. `valid` (N x M, None = all): the keys the query may
    meet at all (not itself, not an empty queue slot).
    """
    own = positive_mask(q.ids, k.ids)  # N x M
    if own_keys is not None:
        own = own & own_keys[None, :]
    mined = None
    if mined_ids is not None:
        mined = positive_mask(q.ids, k.ids, mined_ids, same_id=False)  # N x M
        mined = mined | positive_mask(q.groups, k.groups)  # -1 groups match nothing
    pos = own if extra_pos is None else own | extra_pos
    if use == "attract" and mined is not None:
        pos = pos | mined
    cancel = mined if use == "cancel" else None
    same = same_image_mask(q.images, k.images)  # N x M
    pos_r, valid_r = resolve_masks(pos, valid, cancel, same)
    return ContrastMasks(pos_r, valid_r, own, same, mined, valid)
