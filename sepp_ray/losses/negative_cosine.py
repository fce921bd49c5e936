"""Negative cosine similarity: the prediction loss of SimSiam and BYOL.

SimSiam (arXiv 2011.10566) minimises -cos(p, stopgrad(z)); BYOL (arXiv 2006.07733) minimises
||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z). Both are here so each method can match its paper's
numbers; the caller detaches the target z (the stop-gradient is the method's, not the loss').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _cosine(p: Tensor, z: Tensor, eps: float) -> Tensor:
    """Row-wise cosine similarity in float32 (float64 stays float64) and outside autocast."""
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(f"p and z must both be N x D, got {tuple(p.shape)} and {tuple(z.shape)}")
    dtype = torch.promote_types(torch.promote_types(p.dtype, z.dtype), torch.float32)
    with torch.autocast(device_type=p.device.type, enabled=False):
        return F.cosine_similarity(p.to(dtype), z.to(dtype), dim=1, eps=eps)  # N


def negative_cosine_similarity(p: Tensor, z: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean over rows of -cos(p_i, z_i); p, z: N x D. SimSiam's D(p, z) (arXiv 2011.10566)."""
    return -_cosine(p, z, eps).mean()


def byol_loss(p: Tensor, z: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean over rows of 2 - 2 cos(p_i, z_i) = ||p/|p| - z/|z|||^2 (BYOL, arXiv 2006.07733)."""
    return (2.0 - 2.0 * _cosine(p, z, eps)).mean()
