"""LARS against updates computed by hand, parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from sepp_ray.errors import SeppError
from sepp_ray.train.optim import (
    LARS,
    build_optimizer,
    param_groups,
    scaled_lr,
    set_lr,
    warmup_cosine,
)

LR, MOM, WD, ETA = 0.5, 0.9, 0.1, 0.001


def toy() -> tuple[nn.Parameter, nn.Parameter, LARS]:
    """A weight (adapted, decayed) and a bias (excluded) with fixed values."""
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([2.0]))
    opt = LARS(
        [
            {"params": [w], "weight_decay": WD},
            {"params": [b], "weight_decay": WD, "lars_exclude": True},  # WD must be ignored
        ],
        lr=LR,
        momentum=MOM,
        eta=ETA,
    )
    return w, b, opt


def test_lars_trust_ratio_and_momentum_by_hand() -> None:
    w, b, opt = toy()
    # step 1: g' = g + wd * w = (1.3, 0.4); trust = eta * 5 / ||g'||; v = lr * trust * g'
    w.grad = torch.tensor([[1.0, 0.0]])
    b.grad = torch.tensor([0.5])
    opt.step()
    g1 = (1.0 + WD * 3.0, 0.0 + WD * 4.0)
    t1 = ETA * 5.0 / math.hypot(*g1)
    v1 = [LR * t1 * g for g in g1]
    w1 = [3.0 - v1[0], 4.0 - v1[1]]
    torch.testing.assert_close(w.detach(), torch.tensor([w1]))
    # excluded: no decay, no trust ratio: plain lr * g
    torch.testing.assert_close(b.detach(), torch.tensor([2.0 - LR * 0.5]))

    # step 2: momentum carries lr * trust * g' of step 1
    w.grad = torch.tensor([[0.0, 2.0]])
    b.grad = torch.tensor([-1.0])
    opt.step()
    g2 = (0.0 + WD * w1[0], 2.0 + WD * w1[1])
    t2 = ETA * math.hypot(*w1) / math.hypot(*g2)
    v2 = [MOM * v1[i] + LR * t2 * g2[i] for i in range(2)]
    torch.testing.assert_close(w.detach(), torch.tensor([[w1[0] - v2[0], w1[1] - v2[1]]]))
    vb2 = MOM * LR * 0.5 + LR * -1.0
    torch.testing.assert_close(b.detach(), torch.tensor([2.0 - LR * 0.5 - vb2]))


def test_lars_zero_norm_uses_trust_one() -> None:
    """A zero weight (fresh zero-init layer) would get no update from eta*||w||/||g||; SimCLR's
    rule falls back to trust 1 there."""
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=0.1, momentum=0.0, weight_decay=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.1))


def test_lars_nesterov() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = LARS([w], lr=1.0, momentum=0.5, weight_decay=0.0, eta=0.1, nesterov=True)
    w.grad = torch.tensor([[0.0, 5.0]])  # trust = 0.1 * 5 / 5 = 0.1, scaled g = (0, 0.5)
    opt.step()  # v = (0, 0.5); update = 0.5 * v + scaled g = (0, 0.75)
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 3.25]]))


def test_param_groups_split() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    frozen = nn.Linear(2, 2)
    for p in frozen.parameters():
        p.requires_grad = False
    model.append(frozen)
    decay, no_decay = param_groups(model, 0.05)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    expected = {model[0].bias, model[1].weight, model[1].bias, model[3].bias}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected}
    assert decay["weight_decay"] == 0.05 and not decay["lars_exclude"]
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"]


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_build_optimizer(name: str) -> None:
    model = nn.Linear(3, 2)
    opt = build_optimizer(name, model, lr=0.2, weight_decay=1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert all(g["lr"] == 0.2 for g in opt.param_groups)
    model(torch.ones(1, 3)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.weight, before)


def test_build_optimizer_refuses_unknown() -> None:
    with pytest.raises(SeppError, match="unknown optimizer 'lamb'"):
        build_optimizer("lamb", nn.Linear(2, 2), lr=0.1, weight_decay=0.0)


def test_warmup_cosine() -> None:
    kw = {"total_steps": 110, "warmup_steps": 10, "base_lr": 2.0, "final_lr": 0.2}
    assert warmup_cosine(0, **kw) == 0.0
    assert warmup_cosine(5, **kw) == pytest.approx(1.0)
    assert warmup_cosine(10, **kw) == pytest.approx(2.0)  # warm-up end = peak
    assert warmup_cosine(60, **kw) == pytest.approx(1.1)  # cosine midpoint = (base + final) / 2
    assert warmup_cosine(110, **kw) == pytest.approx(0.2)
    assert warmup_cosine(500, **kw) == pytest.approx(0.2)
    lrs = [warmup_cosine(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # monotone decay
    assert warmup_cosine(0, 100, 0, 1.0) == 1.0  # no warm-up starts at the peak
    with pytest.raises(SeppError, match="warmup_steps"):
        warmup_cosine(0, 10, 20, 1.0)


def test_scaled_lr() -> None:
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)  # SimCLR: 0.3 x 4096 / 256
    assert scaled_lr(0.075, 4096, rule="sqrt") == pytest.approx(0.3)  # 0.075 x sqrt(16)
    assert scaled_lr(0.3, 4096, rule="none") == 0.3
    assert scaled_lr(1.0, 512, reference=1024) == pytest.approx(0.5)
    with pytest.raises(SeppError, match="rule"):
        scaled_lr(0.3, 256, rule="cubic")
    with pytest.raises(SeppError, match="global_batch"):
        scaled_lr(0.3, 0)


def test_set_lr_respects_lr_scale() -> None:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=1.0)
    set_lr(opt, 3.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3.0, 0.3])


class LoopLARS(torch.optim.Optimizer):
    """The parameter-by-parameter LARS step the package had before its foreach version: the
    oracle the foreach step must match."""

    def __init__(self, params: Any, lr: float, momentum: float, weight_decay: float) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": 0.001,
            "nesterov": False,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, mom, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
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


@functools.cache
def _resnet(name: str, seed: int) -> nn.Module:
    from timm import create_model

    torch.manual_seed(seed)
    return create_model(name, num_classes=10)


def resnet_like(seed: int, name: str = "resnet18") -> nn.Module:
    """A timm ResNet's parameter set at fixed random values (resnet18: 11.2 M values in 62
    tensors); its zero-initialised last BN scales and BN biases exercise the zero-norm rule."""
    return copy.deepcopy(_resnet(name, seed))


@functools.cache
def _grads(shapes: tuple[torch.Size, ...], step: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) * (10.0 ** (i % 5 - 2)) for i, s in enumerate(shapes)]


def fake_grads(model: nn.Module, step: int) -> None:
    """The same gradients for every model of the same shapes at `step`, spanning 1e-2..1e2."""
    grads = _grads(tuple(p.shape for p in model.parameters()), step)
    for p, grad in zip(model.parameters(), grads, strict=True):
        p.grad = grad.clone()
    next(model.parameters()).grad = None  # a parameter without gradient is skipped
    list(model.parameters())[3].grad.zero_()  # a zero gradient: trust 1


@pytest.mark.parametrize(("name", "nesterov"), [("resnet18", False), ("test_resnet", True)])
def test_lars_foreach_matches_loop(name: str, nesterov: bool) -> None:
    """The foreach step equals the old per-parameter loop to 1e-6 over several steps with a
    changing learning rate, on ResNet-18's tensors (weights adapted, biases/BN excluded)."""
    new, old = resnet_like(0, name), resnet_like(0, name)
    opt_new = build_optimizer("lars", new, lr=0.5, weight_decay=1e-4)
    opt_old = LoopLARS(param_groups(old, 1e-4), lr=0.5, momentum=0.9, weight_decay=1e-4)
    for group in (*opt_new.param_groups, *opt_old.param_groups):
        group["nesterov"] = nesterov
    for step in range(3):
        for model in (new, old):
            fake_grads(model, step)
        set_lr(opt_new, 0.5 * (step + 1))
        set_lr(opt_old, 0.5 * (step + 1))
        opt_new.step()
        opt_old.step()
    moved = 0
    start = resnet_like(0, name)
    for (key, a), b, init in zip(
        new.named_parameters(), old.parameters(), start.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=key)
        moved += not torch.equal(a, init)
    assert moved == len(list(new.parameters())) - 1  # all but the one without gradient
    for p_new, p_old in zip(new.parameters(), old.parameters(), strict=True):
        if "momentum_buffer" in opt_old.state[p_old]:
            torch.testing.assert_close(
                opt_new.state[p_new]["momentum_buffer"],
                opt_old.state[p_old]["momentum_buffer"],
                rtol=0,
                atol=1e-6,
            )


def test_lars_matches_timm_without_weight_decay() -> None:
    """timm's Lars (`always_adapt`) takes the same step where the two definitions coincide: no
    weight decay and a constant rate. (With decay timm divides by ||g|| + wd * ||w||, You et
    al.'s bound, where SimCLR's LARS divides by ||g + wd * w||; and timm applies lr after the
    momentum, which differs once the rate changes.)"""
    from timm.optim import Lars

    ours, theirs = resnet_like(1, "test_resnet"), resnet_like(1, "test_resnet")
    opt = build_optimizer("lars", ours, lr=0.3, weight_decay=0.0, exclude_bias_norm=False)
    ref = Lars(theirs.parameters(), lr=0.3, momentum=0.9, always_adapt=True, eps=0.0)
    for step in range(3):
        for model in (ours, theirs):
            fake_grads(model, step)
        opt.step()
        ref.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_lars_benchmark_counts_fewer_ops() -> None:
    """benchmarks/lars.py runs, and the foreach step calls far fewer operators than the loop
    (each call is at least one kernel launch on a GPU)."""
    from benchmarks.lars import run

    rows = {r["optimizer"]: r for r in run("test_resnet", steps=1, device="cpu")}
    loop, foreach = rows["loop (before)"], rows["foreach (sepp)"]
    assert foreach["aten_calls"] * 5 < loop["aten_calls"]
    assert loop["tensors"] > 10 and foreach["step_ms"] > 0
