"""Optimisers and learning-rate / weight-decay schedules for SSL pretraining.

LARS is what SimCLR (arXiv 2002.05709) and BYOL (arXiv 2006.07733) train with at large batch;
SGD and AdamW cover the rest (MoCo-v2, SimSiam, DINO; `sepp_ray.train.optim_defaults` holds each
method's recipe). The schedule is a linear warm-up then a half-cosine decay, computed per step by
the training loop and written with `set_lr` (and `set_wd` for a weight-decay schedule), so a
resumed run needs no scheduler state: what a param group must keep (a fixed learning rate, a
weight-decay schedule's ends) lives in the group and is saved with the optimiser's state_dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from sepp_ray.errors import SeppError

OPTIMIZERS = ("lars", "sgd", "adamw")
LR_RULES = ("linear", "sqrt", "none")


def _by_device_dtype(params: list[Tensor]) -> list[list[int]]:
    """Indices of `params` grouped by (device, dtype): one foreach call needs one of each."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al., arXiv 1708.03888), SimCLR's variant.

    Per parameter tensor w with gradient g (SimCLR's `LARSOptimizer`, classic momentum):
        g <- g + weight_decay * w
        trust = eta * ||w|| / ||g||   (1 where either norm is 0)
        v <- momentum * v + lr * trust * g
        w <- w - v                    (nesterov: w <- w - (momentum * v + lr * trust * g))
    A param group with `lars_exclude=True` (biases and norm layers, see `param_groups`) gets
    neither weight decay nor the trust ratio: its update is plain momentum SGD.

    The step runs on whole lists of tensors with `torch._foreach_*` ops (a handful of kernels
    per group instead of about ten per tensor), and the trust ratios stay device tensors, so a
    step never synchronises the GPU.
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
            with_grad = [p for p in group["params"] if p.grad is not None]
            for idx in _by_device_dtype(with_grad):
                self._update([with_grad[i] for i in idx], group)
        return loss

    def _update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        lr, mom, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
        grads: list[Tensor] = [p.grad for p in params if p.grad is not None]
        if group["lars_exclude"]:
            scaled = torch._foreach_mul(grads, lr)
        else:
            if wd != 0:
                grads = list(torch._foreach_add(grads, params, alpha=wd))
            w_norm = torch.stack(torch._foreach_norm(params))  # n
            g_norm = torch.stack(torch._foreach_norm(grads))  # n
            ok = (w_norm > 0) & (g_norm > 0)
            trust = torch.where(ok, eta * w_norm / g_norm.clamp(min=1e-30), 1.0)
            scaled = torch._foreach_mul(grads, list((trust * lr).unbind(0)))  # one 0-d per tensor
        states = [self.state[p] for p in params]
        fresh = [i for i, s in enumerate(states) if "momentum_buffer" not in s]
        old = [i for i, s in enumerate(states) if "momentum_buffer" in s]
        if old:
            bufs = [states[i]["momentum_buffer"] for i in old]
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, [scaled[i] for i in old])
        for i in fresh:  # the first step: v = lr * trust * g
            states[i]["momentum_buffer"] = scaled[i].clone()
        bufs = [s["momentum_buffer"] for s in states]
        if group["nesterov"]:
            torch._foreach_add_(scaled, bufs, alpha=mom)
            torch._foreach_sub_(params, scaled)
        else:
            torch._foreach_sub_(params, bufs)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    exclude_bias_norm: bool = True,
    bias_lr_scale: float = 1.0,
    fixed_lr_params: Collection[int] = (),
    fixed_lr: float | None = None,
    weight_decay_end: float | None = None,
) -> list[dict[str, Any]]:
    """Trainable parameters in groups: weights (decayed) and biases / norm-layer parameters
    (ndim <= 1: no decay, no LARS adaptation, as SimCLR, BYOL and Barlow Twins exclude them),
    each split again by whether its id is in `fixed_lr_params` (SimSiam's predictor, whose
    rate `set_lr` holds at `fixed_lr`).

    exclude_bias_norm=False: one decayed group (MoCo-v2 and SimSiam decay every parameter).
    bias_lr_scale: the bias/norm group's `lr_scale` (Barlow Twins: 0.0048 / 0.2).
    weight_decay_end: the decayed groups' weight decay goes from `weight_decay` to this by a
    cosine over training (DINO), written by `set_wd`. Frozen parameters (momentum targets)
    are left out. Empty groups are dropped.
    """
    fixed_ids = set(fixed_lr_params)
    if fixed_ids and fixed_lr is None:
        raise SeppError("fixed_lr_params given without fixed_lr: say which rate they keep")
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            excluded = exclude_bias_norm and p.ndim <= 1
            buckets.setdefault((excluded, id(p) in fixed_ids), []).append(p)
    groups = []
    for (excluded, fixed), params in sorted(buckets.items()):
        group: dict[str, Any] = {
            "params": params,
            "weight_decay": 0.0 if excluded else weight_decay,
            "lars_exclude": excluded,
        }
        if excluded and bias_lr_scale != 1.0:
            group["lr_scale"] = bias_lr_scale
        if fixed:
            group["fixed_lr"] = fixed_lr * group.get("lr_scale", 1.0)  # type: ignore[operator]
        if weight_decay_end is not None and not excluded:
            group["weight_decay_start"] = weight_decay
            group["weight_decay_end"] = weight_decay_end
        groups.append(group)
    return groups


def module_params(model: nn.Module, names: Iterable[str]) -> set[int]:
    """Ids of the parameters of `model`'s submodules `names` (e.g. "predictor"); `model` may be
    the Method or a LossModule / DDP wrapper around it. SeppError for a missing submodule."""
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "method", inner)  # LossModule
    ids: set[int] = set()
    for name in names:
        sub = getattr(inner, name, None)
        if not isinstance(sub, nn.Module):
            raise SeppError(
                f"{type(inner).__name__} has no submodule {name!r} to give a fixed learning "
                "rate: fix the recipe's fixed_lr_modules"
            )
        ids |= {id(p) for p in sub.parameters()}
    return ids


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    *,
    exclude_bias_norm: bool = True,
    bias_lr_scale: float = 1.0,
    fixed_lr_modules: Iterable[str] = (),
    weight_decay_end: float | None = None,
) -> torch.optim.Optimizer:
    """`name` in "lars" | "sgd" | "adamw" over `param_groups(model, ...)`.

    Pass the Method (or the LossModule / DDP wrapper around it): its frozen target networks
    are skipped. `lr` is the peak rate; the training loop overwrites it each step, except in the
    groups of `fixed_lr_modules`, which keep `lr` (SimSiam's predictor, arXiv 2011.10566 4.2).
    """
    if name not in OPTIMIZERS:
        raise SeppError(f"unknown optimizer {name!r}: choose one of {list(OPTIMIZERS)}")
    groups = param_groups(
        model,
        weight_decay,
        exclude_bias_norm=exclude_bias_norm,
        bias_lr_scale=bias_lr_scale,
        fixed_lr_params=module_params(model, fixed_lr_modules),
        fixed_lr=lr,
        weight_decay_end=weight_decay_end,
    )
    if not groups:
        raise SeppError("the model has no trainable parameters: nothing to optimise")
    for g in groups:
        g["lr"] = g.get("fixed_lr", lr * g.get("lr_scale", 1.0))
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)


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
    """Write `lr` into every param group, times the group's `lr_scale` if it has one; a group
    with `fixed_lr` keeps that rate (it is not warmed up nor decayed)."""
    for group in optimizer.param_groups:
        fixed = group.get("fixed_lr")
        group["lr"] = fixed if fixed is not None else lr * group.get("lr_scale", 1.0)


def set_wd(optimizer: torch.optim.Optimizer, step: int, total_steps: int) -> None:
    """Weight decay at 0-based `step` in the groups that carry a schedule (`weight_decay_end`):
    a half cosine from `weight_decay_start` to `weight_decay_end` over `total_steps`, without
    warm-up (DINO's `cosine_scheduler(weight_decay, weight_decay_end, ...)`, arXiv 2104.14294).
    Other groups are left as they are."""
    for group in optimizer.param_groups:
        end = group.get("weight_decay_end")
        if end is not None:
            group["weight_decay"] = warmup_cosine(
                step, total_steps, 0, group["weight_decay_start"], end
            )
