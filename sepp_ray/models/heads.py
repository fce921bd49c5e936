"""Projection, prediction and DINO heads that sit on top of a backbone's pooled features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def projection_mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    batch_norm: bool = True,
    last_bn: bool = False,
) -> nn.Sequential:
    """`num_layers` linear layers, Linear-BN-ReLU between them (SimCLR arXiv 2002.05709).

    `last_bn=True` adds a BN without affine parameters on the output, as SimSiam's code
    (arXiv 2011.10566) does on its projector.
    Linear layers followed by BN carry no bias: BN's shift makes it redundant.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def prediction_mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    batch_norm: bool = True,
) -> nn.Sequential:
    """The predictor of BYOL (arXiv 2006.07733) / SimSiam / NNCLR: a projector with no output BN."""
    return projection_mlp(in_dim, hidden_dim, out_dim, num_layers, batch_norm, last_bn=False)


class DINOHead(nn.Module):
    """DINO head (arXiv 2104.14294): MLP to a bottleneck, L2-normalise, weight-normalised linear.

    With `norm_last_layer=True` the weight-norm gain is frozen at 1, so every prototype has unit
    norm: the paper found this stabilises training (at some cost for ViT-S).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        num_layers: int = 3,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(max(num_layers, 1) - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0  # out_dim x 1
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: N x in_dim -> N x out_dim logits (before temperature)
        x = self.mlp(x)
        # fp32 even under autocast: the loss divides these logits by a 0.04 teacher temperature,
        # which turns bf16 rounding (~6e-3 here) into a 25x larger softmax input error
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
            return self.last_layer(x)
