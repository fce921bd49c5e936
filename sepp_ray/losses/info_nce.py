"""InfoNCE with positives given as data: one contrastive code path for every kind of positive.

Which keys are positives for a query is a boolean mask built from image ids (solo-learn's
`pos_mask`), not a batch position. Two views of one image, mined semantic pairs (SePP, arXiv
2306.16122), curated pairs and class labels (SupCon, arXiv 2004.11362) are then only different
masks over the same loss. With one positive per anchor the loss is SimCLR's NT-Xent (arXiv
2002.05709) or, with a queue as keys, MoCo's InfoNCE (arXiv 1911.05722). A third mask, also
from ids, removes mined positives from the negatives instead of attracting them: false-negative
cancellation (Huynh et al., WACV 2022, arXiv 2011.11765).
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


def info_nce_loss(
    query: Tensor,
    keys: Tensor,
    pos_mask: Tensor,
    temperature: float,
    valid_mask: Tensor | None = None,
    cancel_mask: Tensor | None = None,
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
    is `pos_mask`).

    Math runs in float32 (float64 stays float64) and outside autocast, with logsumexp, so
    bf16/fp16 inputs and small temperatures stay finite. Anchors without a positive are left
    out of the mean (they carry no signal); ValueError if no anchor has one while
    `dist.checks_enabled()` (a host sync), else the loss is NaN (0 / 0), which the training
    step's non-finite guard reports.
    """
    if query.dim() != 2 or keys.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(
            f"query must be N x D and keys M x D, got {tuple(query.shape)} and {tuple(keys.shape)}"
        )
    n, m = query.shape[0], keys.shape[0]
    if pos_mask.shape != (n, m):
        raise ValueError(f"pos_mask must be {n} x {m}, got {tuple(pos_mask.shape)}")
    for name, mask in (("valid_mask", valid_mask), ("cancel_mask", cancel_mask)):
        if mask is not None and mask.shape != (n, m):
            raise ValueError(f"{name} must be {n} x {m}, got {tuple(mask.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    dtype = torch.promote_types(torch.promote_types(query.dtype, keys.dtype), torch.float32)
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = F.normalize(query.to(dtype), dim=1)  # N x D
        k = F.normalize(keys.to(dtype), dim=1)  # M x D
        pos = pos_mask.to(device=q.device, dtype=torch.bool)  # N x M
        valid = None if valid_mask is None else valid_mask.to(device=q.device, dtype=torch.bool)
        if valid is not None:
            pos = pos & valid
        if cancel_mask is not None:
            # cancelled keys leave the denominator; a positive is never cancelled
            keep = ~cancel_mask.to(device=q.device, dtype=torch.bool) | pos  # N x M
            valid = keep if valid is None else valid & keep
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
        # where(), not a product: log_prob is -inf on invalid keys and -inf * 0 is nan
        pos_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)  # N
        per_anchor = pos_log_prob / n_pos.clamp(min=1)  # N, 0 where no positive
        return -per_anchor.sum() / has_pos.sum()
