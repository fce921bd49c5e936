"""Linear probe: a linear classifier on frozen, standardised features, with a learning-rate sweep.

The standard measure of a self-supervised representation (SimCLR arXiv 2002.05709, MoCo
arXiv 1911.05722, MAE arXiv 2111.06377, whose BatchNorm-without-affine before the classifier is
what standardising with the training statistics amounts to at test time). The learning rate is
chosen on a held-out part of the training split, never on the test split; the chosen rate is
then refit on the whole training split and scored once on the test split.

All learning rates train at once, on the same mini-batches, as one stacked weight tensor with a
parameter group each: a sweep of L rates costs about one fit on the device of the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepp_ray.config import opt
from sepp_ray.errors import SeppError
from sepp_ray.models.knn import topk_accuracy


@dataclass(frozen=True)
class LinearProbeConfig:
    """How the linear classifier is trained."""

    lrs: list[float] = opt(
        [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "learning rates swept (the best on held-out train wins)"
    )
    epochs: int = opt(100, "passes over the training features")
    batch_size: int = opt(1024, "features per step")
    optimizer: str = opt("adamw", "adamw or sgd (momentum 0.9, Nesterov)")
    weight_decay: float = opt(1e-4, "weight decay of the classifier weights")
    val_fraction: float = opt(0.1, "share of the training split held out to choose the rate")
    refit: bool = opt(True, "retrain on the whole training split at the chosen rate")

    def validate(self) -> None:
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise SeppError(f"linear probe lrs must be positive numbers, got {self.lrs}")
        if self.epochs < 1 or self.batch_size < 1:
            raise SeppError("linear probe epochs and batch_size must be >= 1")
        if self.optimizer not in ("adamw", "sgd"):
            raise SeppError(f"linear probe optimizer must be adamw or sgd, got {self.optimizer!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise SeppError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


class StackedLinear(nn.Module):
    """L independent linear classifiers over the same input: logits L x B x C."""

    def __init__(self, n: int, dim: int, num_classes: int, generator: torch.Generator) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)  # nn.Linear's default init
        self.weights = nn.ParameterList(
            nn.Parameter((torch.rand(dim, num_classes, generator=generator) * 2 - 1) * bound)
            for _ in range(n)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(num_classes)) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        w = torch.stack(list(self.weights))  # w: L x D x C
        b = torch.stack(list(self.biases))  # b: L x C
        return torch.einsum("nd,ldc->lnc", x, w) + b[:, None, :]  # L x B x C


def standardize(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Scale every set with the mean and std of ``train`` (BN without affine, frozen)."""
    mean = train.mean(dim=0, keepdim=True)  # 1 x D
    std = train.std(dim=0, keepdim=True).clamp(min=1e-6)  # 1 x D
    return [(t - mean) / std for t in (train, *others)]


def fit_linear(
    x: Tensor, y: Tensor, num_classes: int, lrs: list[float], cfg: LinearProbeConfig, seed: int
) -> StackedLinear:
    """Train one classifier per learning rate on (x: N x D, y: N) with a cosine schedule."""
    g = torch.Generator().manual_seed(seed)
    model = StackedLinear(len(lrs), x.shape[1], num_classes, g).to(x.device)
    groups = [
        {"params": [w, b], "lr": lr}
        for w, b, lr in zip(model.weights, model.biases, lrs, strict=True)
    ]
    opt: torch.optim.Optimizer
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    n = x.shape[0]
    bs = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
    )
    y = y.to(x.device, torch.long)
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g).to(x.device)
        for i in range(steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            logits = model(x[idx])  # logits: L x B x C
            # sum over classifiers: each one's gradient is its own mean cross-entropy
            loss = (
                F.cross_entropy(
                    logits.reshape(-1, num_classes), y[idx].repeat(len(lrs)), reduction="sum"
                )
                / idx.numel()
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


@torch.no_grad()
def _scores(model: StackedLinear, x: Tensor, chunk: int = 65536) -> Tensor:
    return torch.cat([model(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)], dim=1)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    cfg: LinearProbeConfig | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Sweep, choose, refit, test. Accuracies are fractions in [0, 1].

    ``train_x``: N x D, ``test_x``: M x D on one device (the probe runs there); labels are
    class indices (rows < 0 are unlabeled and dropped). ``seed`` fixes the held-out split,
    the initialisation and the batch order.
    """
    cfg = cfg or LinearProbeConfig()
    cfg.validate()
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise SeppError(
            f"linear probe needs N x D train and M x D test features of one width, got "
            f"{tuple(train_x.shape)} and {tuple(test_x.shape)}"
        )
    dev = train_x.device
    keep, tkeep = train_y >= 0, test_y >= 0
    x, y = train_x[keep].float(), train_y[keep].to(dev, torch.long)
    tx, ty = test_x[tkeep].to(dev).float(), test_y[tkeep].to(dev, torch.long)
    if x.shape[0] < 2 or tx.shape[0] == 0:
        raise SeppError(
            f"linear probe needs >= 2 labeled train and >= 1 labeled test features, got "
            f"{x.shape[0]} and {tx.shape[0]}"
        )
    if int(max(y.max(), ty.max())) >= num_classes:
        raise SeppError(f"a label is >= num_classes={num_classes}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g).to(dev)
    n_val = min(x.shape[0] - 1, max(1, round(cfg.val_fraction * x.shape[0])))
    val_i, fit_i = perm[:n_val], perm[n_val:]
    fx, vx = standardize(x[fit_i], x[val_i])
    sweep = fit_linear(fx, y[fit_i], num_classes, list(cfg.lrs), cfg, seed)
    val_scores = _scores(sweep, vx)  # L x V x C
    val_top1 = [topk_accuracy(s, y[val_i], (1,))[0] for s in val_scores]
    best = max(range(len(cfg.lrs)), key=lambda i: (val_top1[i], -i))
    lr = float(cfg.lrs[best])
    if cfg.refit:
        ax, atx = standardize(x, tx)
        final = fit_linear(ax, y, num_classes, [lr], cfg, seed)
        test_scores = _scores(final, atx)[0]
    else:
        _, ttx = standardize(x[fit_i], tx)
        test_scores = _scores(sweep, ttx)[best]
    top1, top5 = topk_accuracy(test_scores, ty)
    return {
        "top1": top1,
        "top5": top5,
        "best_lr": lr,
        "val_top1": {str(lr_): acc for lr_, acc in zip(cfg.lrs, val_top1, strict=True)},
        "train_size": int(x.shape[0]),
        "test_size": int(tx.shape[0]),
    }
