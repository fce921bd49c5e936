"""LARS step cost: the old parameter-by-parameter loop against the foreach step, side by side.

Both update the same parameter set (a timm ResNet's, random gradients) with the same settings:
weight decay on weights, biases and norm layers excluded (SimCLR's groups). Reported per step:
the wall time (median of `--steps`), the ATen operator calls (on a GPU each is at least one
kernel launch; a foreach operator covers many tensors in one launch) and, on CUDA, the kernels
the profiler saw. timm's foreach `Lars` runs alongside as a well-kept library's reference
(its trust ratio differs slightly: see tests/test_optim.py).

    python -m benchmarks.lars [--model resnet18] [--steps 20] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sepp_ray.train.optim import LARS, param_groups
from tests.test_optim import LoopLARS

LR, WD = 0.5, 1e-6


class _CountOps(TorchDispatchMode):
    """Counts ATen operator calls made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizers() -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    from timm.optim import Lars

    return {
        "loop (before)": lambda m: LoopLARS(param_groups(m, WD), LR, 0.9, WD),
        "foreach (sepp)": lambda m: LARS(param_groups(m, WD), LR, momentum=0.9, weight_decay=WD),
        "timm Lars foreach": lambda m: Lars(
            param_groups(m, WD), lr=LR, momentum=0.9, weight_decay=WD, foreach=True
        ),
    }


def measure(model: nn.Module, make: Callable[[nn.Module], Any], steps: int) -> dict[str, Any]:
    """Median step seconds, ATen calls and (CUDA) kernels per step of one optimiser."""
    device = next(model.parameters()).device
    model = copy.deepcopy(model)
    opt = make(model)
    g = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, device=device)
    for _ in range(3):  # momentum buffers exist after the first step
        opt.step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    with _CountOps() as counter:
        opt.step()
    kernels = None
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            _sync(device)
        kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    return {
        "step_ms": statistics.median(times) * 1e3,
        "aten_calls": counter.calls,
        "kernels": kernels,
    }


def run(model_name: str = "resnet18", steps: int = 20, device: str | None = None) -> list[dict]:
    from timm import create_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).to(dev)
    n_tensors = sum(1 for _ in model.parameters())
    rows = []
    for name, make in _optimizers().items():
        rows.append(
            {
                "optimizer": name,
                "model": model_name,
                "tensors": n_tensors,
                "device": str(dev),
                **measure(model, make, steps),
            }
        )
    base = rows[0]["step_ms"]
    for row in rows:
        row["speedup"] = base / row["step_ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    rows = run(a.model, a.steps, a.device)
    head = ["optimizer", "model (tensors)", "device", "ms/step", "ATen calls/step", "CUDA kernels"]
    print("| " + " | ".join([*head, "speed-up"]) + " |")
    print("|" + "---|" * (len(head) + 1))
    for r in rows:
        kernels = "-" if r["kernels"] is None else r["kernels"]
        cells = [r["optimizer"], f"{r['model']} ({r['tensors']})", r["device"]]
        cells += [f"{r['step_ms']:.2f}", r["aten_calls"], kernels, f"{r['speedup']:.2f}x"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
