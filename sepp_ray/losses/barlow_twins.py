"""Barlow Twins: make the cross-correlation of two views' embeddings the identity (arXiv
2103.03230).

On-diagonal terms pull each dimension of the two views together; off-diagonal terms
decorrelate dimensions (redundancy reduction), which prevents collapse without negatives. The
authors standardise with a batch norm synchronised over all ranks and divide by the global
batch; gathering the embeddings (`dist.gather`) does the same, so W ranks under DDP equal one
process on the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sepp_ray import dist


def _standardise(z: Tensor, eps: float) -> Tensor:
    """Zero mean, unit (biased) variance per dimension over the batch, as BatchNorm1d in
    training mode without affine parameters."""
    mean = z.mean(dim=0, keepdim=True)  # 1 x D
    var = z.var(dim=0, unbiased=False, keepdim=True)  # 1 x D
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(
    z_a: Tensor,
    z_b: Tensor,
    lambda_offdiag: float = 0.0051,
    gather: bool = True,
    eps: float = 1e-5,
) -> Tensor:
    """sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2, C = std(z_a)^T std(z_b) / N (D x D).

    z_a, z_b: N x D. With `gather`, standardisation and C use the batch of all ranks; without a
    process group it changes nothing. Math in float32 (float64 stays float64), outside autocast.
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(
            f"z_a and z_b must both be N x D, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(z_a.dtype, z_b.dtype), torch.float32)
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        a, b = z_a.to(dtype), z_b.to(dtype)
        if gather:
            a, b = dist.gather(a), dist.gather(b)  # (W * N) x D
        n = a.shape[0]
        if n < 2:
            raise ValueError("barlow_twins_loss needs a batch of at least 2 to standardise")
        c = _standardise(a, eps).T @ _standardise(b, eps) / n  # D x D
        on_diag = (torch.diagonal(c) - 1.0).pow(2).sum()
        off_diag = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
        return on_diag + lambda_offdiag * off_diag
