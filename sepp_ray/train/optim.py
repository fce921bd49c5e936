"""Optimisers and learning-rate schedules for SSL pretraining.

LARS is what SimCLR (arXiv 2002.05709) and BYOL (arXiv 2006.07733) train with at large batch;
SGD and AdamW cover the rest (ViTs, small batches). The schedule is a linear warm-up then a
half-cosine decay, computed per step by the training loop and written with `set_lr`, so a resumed
run needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from sepp_ray.errors import SeppError

OPTIMIZERS = ("lars", "sgd", "adamw")
LR_RULES = ("linear", "sqrt", "none")


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., arXiv 1708.03888), SimCLR's variant.

    Per parameter tensor w with gradient g (SimCLR's `LARSOptimizer`, classic momentum):
        g <- g + weight_decay * w
        trust = eta * ||w|| / ||g||   (1 where either norm is 0)
        v <- momentum * v + lr * trust * g
        w <- w - v                    (nesterov: w <- w - (momentum * v + lr * trust * g))
    A param group with `lars_exclude=True` (biases and norm layers, see `param_groups`) gets
    neither weight decay nor the trust ratio: its update is plain momentum SGD. The trust ratio
    stays a device tensor, so a step never synchronises the GPU.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(
                f"LARS needs lr, momentum, weight_decay >= 0 and eta > 0; got lr={lr}, "
                f"momentum={momentum}, weight_decay={weight_decay}, eta={eta}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "nesterov": nesterov,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            exclude = group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not exclude:
                    if wd != 0:
                        g = g.add(p, alpha=wd)
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    ok = (w_norm > 0) & (g_norm > 0)
                    trust = torch.where(ok, eta * w_norm / g_norm.clamp(min=1e-30), 1.0)
                    g = g * (trust * lr)
                else:
                    g = g * lr
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                    buf = state["momentum_buffer"]
                else:
                    buf = state["momentum_buffer"]
                    buf.mul_(mom).add_(g)
                p.sub_(g.add(buf, alpha=mom) if group["nesterov"] else buf)
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split in two groups: weights (decayed) and biases / norm-layer
    parameters (ndim <= 1: no decay, no LARS adaptation), as SimCLR and BYOL exclude them.

    Frozen parameters (momentum targets) are left out. Empty groups are dropped.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """`name` in "lars" | "sgd" | "adamw" over `param_groups(model, weight_decay)`.

    Pass the Method (or the LossModule / DDP wrapper around it): its frozen target networks
    are skipped. `lr` is the peak rate; the training loop overwrites it each step.
    """
    groups = param_groups(model, weight_decay)
    if not groups:
        raise SeppError("the model has no trainable parameters: nothing to optimise")
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    raise SeppError(f"unknown optimizer {name!r}: choose one of {list(OPTIMIZERS)}")


def scaled_lr(
    base_lr: float, global_batch: int, reference: int = 256, rule: str = "linear"
) -> float:
    """Peak learning rate for `global_batch` images per step.

    "linear": base * batch / reference (Goyal et al. arXiv 1706.02677; SimCLR's 0.3 x B/256),
    "sqrt": base * sqrt(batch / reference) (SimCLR appendix B.1, better at small batch),
    "none": base unchanged.
    """
    if global_batch <= 0 or reference <= 0:
        raise SeppError(
            f"global_batch and reference must be > 0, got {global_batch} and {reference}"
        )
    if rule == "linear":
        return base_lr * global_batch / reference
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / reference)
    if rule == "none":
        return base_lr
    raise SeppError(f"unknown lr scaling rule {rule!r}: choose one of {list(LR_RULES)}")


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float = 0.0
) -> float:
    """Learning rate at 0-based `step`: linear from 0 to `base_lr` over `warmup_steps`, then a
    half cosine down to `final_lr` at `total_steps` (MAE/DINO's per-iteration schedule;
    SGDR, arXiv 1608.03983). Steps past the end stay at `final_lr`."""
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise SeppError(
            f"need total_steps > 0 and 0 <= warmup_steps <= total_steps, got "
            f"total_steps={total_steps}, warmup_steps={warmup_steps}"
        )
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return final_lr
    frac = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write `lr` into every param group, times the group's `lr_scale` if it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
