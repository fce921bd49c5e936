"""InfoNCE with positives given as data: one contrastive code path for every kind of positive.

Which keys are positives for a query is a boolean mask built from image ids (solo-learn's
`pos_mask`), not a batch position. Two views of one image, mined semantic pairs (SePP, arXiv
2306.16122), curated pairs and class labels (SupCon, arXiv 2004.11362) are then only different
masks over the same loss. With one positive per anchor the loss is SimCLR's NT-Xent (arXiv
2002.05709) or, with a queue as keys, MoCo's InfoNCE (arXiv 1911.05722). A third mask, also
from ids, removes mined positives from the negatives instead of attracting them: false-negative
cancellation (Huynh et al., WACV 2022, arXiv 2011.11765). A fourth, also from ids, says which
keys are made of an image the query is made of (`same_image_mask`): those are never negatives,
whatever the arm, so no image is pushed away from itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sepp_ray import dist


def positive_mask(
    query_ids: Tensor,
    key_ids: Tensor,
    query_pos_ids: Tensor | None = None,
    same_id: bool = True,
) -> Tensor:
    """Bool N x M: key j is a positive of query i.

    True where `key_ids[j] == query_ids[i]` (another view of the same image; only with
    `same_id`) or `key_ids[j]` is one of `query_pos_ids[i]` (N x P semantic positives, -1
    padded). Ids are int64 image ids (or class labels, for SupCon); negative ids mean "none" and
    never match anything, so padding in `query_pos_ids` and unfilled queue slots in `key_ids`
    are never positives. The same function builds the cancellation mask of `info_nce_loss`.
    """
    if query_ids.dim() != 1 or key_ids.dim() != 1:
        raise ValueError(
            f"query_ids and key_ids must be 1-D, got {tuple(query_ids.shape)} "
            f"and {tuple(key_ids.shape)}"
        )
    q = query_ids.to(key_ids.device)
    key_ok = key_ids >= 0  # M
    if same_id:
        mask = (q[:, None] == key_ids[None, :]) & key_ok[None, :]  # N x M
    else:
        mask = torch.zeros(q.shape[0], key_ids.shape[0], dtype=torch.bool, device=key_ids.device)
    if query_pos_ids is not None:
        if query_pos_ids.dim() != 2 or query_pos_ids.shape[0] != q.shape[0]:
            raise ValueError(
                f"query_pos_ids must be N x P with N={q.shape[0]}, got {tuple(query_pos_ids.shape)}"
            )
        pos = query_pos_ids.to(key_ids.device)
        # one N x M comparison per column keeps memory at N x M, not N x P x M (MoCo queues)
        for p in range(pos.shape[1]):
            mask |= pos[:, p : p + 1] == key_ids[None, :]
        mask &= key_ok[None, :]
    return mask


def self_mask(
    n_local: int, m_global: int, offset: int, device: torch.device | str | None = None
) -> Tensor:
    """Bool n_local x m_global, True everywhere but each query's own column `offset + i`.

    Use as `valid_mask` when the keys contain the queries themselves: with queries q (n x D)
    and keys `dist.gather(q)`, `offset = dist.global_offset(n)` (SimCLR's self-similarity).
    """
    if offset < 0 or offset + n_local > m_global:
        raise ValueError(f"rows {offset}..{offset + n_local} do not fit in {m_global} columns")
    mask = torch.ones(n_local, m_global, dtype=torch.bool, device=device)
    rows = torch.arange(n_local, device=device)
    mask[rows, rows + offset] = False
    return mask


def same_image_mask(query_images: Tensor, key_images: Tensor) -> Tensor:
    """Bool N x M: query row i and key row j are made of at least one common image.

    `query_images` N x A and `key_images` M x B hold the image ids each row is made of (an item's
    two views: the anchor's and the positive's id for a pair item, the image's id twice for an
    original); negative ids mean "none" and match nothing. Two items that share any image count
    as one image for the negatives: a pair item (A, P) and the original of P are never negatives
    of each other, or the pair's positive would be pushed away in the same step.
    """
    if query_images.dim() != 2 or key_images.dim() != 2:
        raise ValueError(
            f"query_images and key_images must be N x A and M x B, got "
            f"{tuple(query_images.shape)} and {tuple(key_images.shape)}"
        )
    # "none" becomes -1 in the queries and -2 in the keys, so it never matches: one N x M
    # comparison per (a, b), never an N x A x M x B tensor
    q = query_images.to(key_images.device).clamp(min=-1)  # N x A
    k = torch.where(key_images >= 0, key_images, -2)  # M x B
    mask = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device)
    for b in range(k.shape[1]):
        for a in range(q.shape[1]):
            mask |= q[:, a : a + 1] == k[None, :, b]  # N x M
    return mask


def resolve_masks(
    pos_mask: Tensor,
    valid_mask: Tensor | None = None,
    cancel_mask: Tensor | None = None,
    same_image: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The (positives, softmax keys) that `info_nce_loss` uses, both N x M (keys None = all).

    A positive outside `valid_mask` is no positive. Cancelled keys and keys sharing an image
    with the query leave the softmax unless they are positives: "positives are data", so the
    other view of the query's own item stays its positive. Applying it twice changes nothing,
    so a caller may resolve once and pass the result on (and count pairs from it).
    """
    pos = pos_mask.to(dtype=torch.bool)  # N x M
    valid = None if valid_mask is None else valid_mask.to(device=pos.device, dtype=torch.bool)
    if valid is not None:
        pos = pos & valid
    removed = None
    for mask in (cancel_mask, same_image):
        if mask is not None:
            m = mask.to(device=pos.device, dtype=torch.bool)
            removed = m if removed is None else removed | m
    if removed is not None:
        keep = ~removed | pos  # N x M: a positive is never removed
        valid = keep if valid is None else valid & keep
    return pos, valid


def pair_counts(
    same_image: Tensor,
    pos: Tensor,
    valid: Tensor | None,
    mined: Tensor | None = None,
    candidates: Tensor | None = None,
) -> dict[str, Tensor]:
    """What one InfoNCE call did with image identity and mined pairs: float 0-dim device
    tensors (summed on the device, never read here: no host sync).

    `pos`, `valid`: the masks the softmax used (`resolve_masks`). `same_image`: which keys
    share an image with their query, from ids (`same_image_mask`). `same_image_negatives`:
    such (query, key) pairs that are still negatives, i.e. in the softmax and not positives;
    0 whenever the loss masked them, so the run metric proves the mask. `pairs_used`: mined
    (query, key) pairs (`mined`, N x M) between different images among the `candidates` (the
    keys the query may meet at all: not itself, not an empty queue slot; None = all), i.e.
    the mined pairs attracted or cancelled in this call.
    """
    negatives = ~pos if valid is None else valid & ~pos  # N x M
    out = {"same_image_negatives": torch.count_nonzero(same_image & negatives).float()}
    if mined is None:
        out["pairs_used"] = torch.zeros((), device=pos.device)
        return out
    used = mined & ~same_image  # N x M
    if candidates is not None:
        used &= candidates
    out["pairs_used"] = torch.count_nonzero(used).float()
    return out


def info_nce_loss(
    query: Tensor,
    keys: Tensor,
    pos_mask: Tensor,
    temperature: float,
    valid_mask: Tensor | None = None,
    cancel_mask: Tensor | None = None,
    *,
    same_image: Tensor | None = None,
    aug_mask: Tensor | None = None,
    aug_weight: float | None = None,
) -> Tensor:
    """Multi-positive InfoNCE, SupCon's L_out form (arXiv 2004.11362, eq. 2).

    query N x D and keys M x D are L2-normalised here. For each anchor i with at least one
    positive, the loss is the mean over its positives p of -log softmax_j(q_i . k_j / t)[p],
    the softmax running over the keys allowed by `valid_mask` (N x M, None = all); the result
    is the mean over those anchors. A key outside `valid_mask` is never a positive, so the
    caller may build `pos_mask` from ids alone and remove self-similarity with `valid_mask`.
    With exactly one positive per anchor this is NT-Xent / InfoNCE.

    `cancel_mask` (N x M, None = none): keys that are neither attracted nor repelled, i.e.
    removed from the softmax's denominator unless they are positives. This is the "false
    negative elimination" of Huynh et al. (WACV 2022, arXiv 2011.11765): a mined positive of
    the anchor stops being a negative without becoming an extra positive (their "attraction"
    is `pos_mask`). `same_image` (N x M, `same_image_mask`): keys made of an image the query
    is made of, removed from the denominator in the same way, in every arm.

    `aug_weight` (None, or in [0, 1], with `aug_mask` N x M: the positives that are the query's
    own augmentation pair): None gives every positive of an anchor the same weight, so with P
    mined positives the augmentation pair is one term of 1 + P, as when each semantic pair is a
    training pair of its own beside the augmentation pairs (SePP-ID's combined dataset, arXiv
    2306.16122). A number w gives the augmentation pair(s) weight w and the other positives
    1 - w together, whatever P; an anchor with only one kind gives that kind weight 1.

    Math runs in float32 (float64 stays float64) and outside autocast, with logsumexp, so
    bf16/fp16 inputs and small temperatures stay finite. Anchors without a positive are left
    out of the mean (they carry no signal); ValueError if no anchor has one while
    `dist.checks_enabled()` (a host sync), else the loss is NaN (0 / 0), which the training
    step's non-finite guard reports.
    """
    masks = {"pos_mask": pos_mask, "valid_mask": valid_mask, "cancel_mask": cancel_mask}
    _check_args(query, keys, {**masks, "same_image": same_image, "aug_mask": aug_mask})
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if aug_weight is not None and not 0.0 <= aug_weight <= 1.0:
        raise ValueError(f"aug_weight must be in [0, 1] or None, got {aug_weight}")

    dtype = torch.promote_types(torch.promote_types(query.dtype, keys.dtype), torch.float32)
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = F.normalize(query.to(dtype), dim=1)  # N x D
        k = F.normalize(keys.to(dtype), dim=1)  # M x D
        pos, valid = resolve_masks(pos_mask.to(q.device), valid_mask, cancel_mask, same_image)
        n_pos = pos.sum(dim=1)  # N
        has_pos = n_pos > 0  # N
        if dist.checks_enabled() and not bool(has_pos.any()):  # a host sync
            raise ValueError(
                "info_nce_loss: no anchor has a positive key (pos_mask & valid_mask is all "
                "False); check the ids given to positive_mask and that the keys include "
                "each query's other view"
            )

        logits = q @ k.T / temperature  # N x M
        if valid is not None:
            # rows without a positive are dropped below; keeping all their keys valid spares
            # them a logsumexp over nothing (-inf - -inf = nan in the backward)
            valid = valid | ~has_pos[:, None]
            logits = logits.masked_fill(~valid, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # N x M
        if aug_weight is None or aug_mask is None:
            per_anchor = _mean_over(pos, log_prob)  # N, 0 where no positive
        else:
            aug = pos & aug_mask.to(device=pos.device, dtype=torch.bool)  # N x M
            other = pos & ~aug
            has_other = other.any(dim=1)  # N
            w = torch.where(has_other, torch.where(aug.any(dim=1), aug_weight, 0.0), 1.0)  # N
            per_anchor = w * _mean_over(aug, log_prob) + (1 - w) * _mean_over(other, log_prob)
        return -per_anchor.sum() / has_pos.sum()


def _check_args(query: Tensor, keys: Tensor, masks: dict[str, Tensor | None]) -> None:
    """ValueError unless query is N x D, keys M x D and every given mask N x M."""
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(
            f"query must be N x D and keys M x D, got {tuple(query.shape)} and {tuple(keys.shape)}"
        )
    n, m = query.shape[0], keys.shape[0]
    for name, mask in masks.items():
        if mask is not None and mask.shape != (n, m):
            raise ValueError(f"{name} must be {n} x {m}, got {tuple(mask.shape)}")


def _mean_over(mask: Tensor, log_prob: Tensor) -> Tensor:
    """N: each row's mean of `log_prob` over `mask` (N x M), 0 for a row with none."""
    # where(), not a product: log_prob is -inf on invalid keys and -inf * 0 is nan
    total = torch.where(mask, log_prob, torch.zeros_like(log_prob)).sum(dim=1)  # N
    return total / mask.sum(dim=1).clamp(min=1)
