"""VICReg: variance-invariance-covariance regularisation (arXiv 2105.04906).

Invariance pulls the two embeddings of one image together; variance keeps every dimension's
standard deviation above 1 and covariance decorrelates dimensions, which prevents collapse
without negatives. As in the authors' code (facebookresearch/vicreg), invariance uses the local
batch and variance/covariance the batch gathered from all ranks, so W ranks under DDP equal one
process on the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sepp_ray import dist


def _variance(z: Tensor, eps: float) -> Tensor:
    """Mean hinge on each dimension's std (unbiased, as torch.var): relu(1 - sqrt(var + eps))."""
    std = torch.sqrt(z.var(dim=0) + eps)  # D
    return F.relu(1.0 - std).mean()


def _covariance(z: Tensor) -> Tensor:
    """Sum of squared off-diagonal covariances, divided by D."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = z.T @ z / (n - 1)  # D x D
    off = cov - torch.diag(torch.diagonal(cov))
    return off.pow(2).sum() / d


def vicreg_loss(
    z_a: Tensor,
    z_b: Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    gather: bool = True,
) -> Tensor:
    """sim * MSE(z_a, z_b) + std * (v(z_a) + v(z_b)) / 2 + cov * (c(z_a) + c(z_b)); z: N x D.

    With `gather`, the variance and covariance terms use the batch of all ranks (`dist.gather`,
    gradients flow back to this rank's rows); without a process group it changes nothing.
    Math in float32 (float64 stays float64), outside autocast.
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(
            f"z_a and z_b must both be N x D, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(z_a.dtype, z_b.dtype), torch.float32)
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        a, b = z_a.to(dtype), z_b.to(dtype)
        inv = F.mse_loss(a, b)
        if gather:
            a, b = dist.gather(a), dist.gather(b)  # (W * N) x D
        if a.shape[0] < 2:
            raise ValueError("vicreg_loss needs a batch of at least 2 to estimate variances")
        var = 0.5 * (_variance(a, eps) + _variance(b, eps))
        cov = _covariance(a) + _covariance(b)
        return sim_coeff * inv + std_coeff * var + cov_coeff * cov
