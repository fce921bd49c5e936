"""Collectives behind one small module, with no-op fallbacks when no process group exists.

Losses and methods talk across ranks only through these functions (as lightly's `utils/dist.py`),
so the same code runs on a laptop, under DDP with gloo, and on a GPU cluster with NCCL. Every
function here works on the default process group and on the device of its input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor


def is_dist() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    """Number of ranks; 1 without a process group."""
    return torch_dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """This process' rank; 0 without a process group."""
    return torch_dist.get_rank() if is_dist() else 0


_CHECKS: ContextVar[bool] = ContextVar("sepp_host_checks", default=True)


def checks_enabled() -> bool:
    """Whether input checks that cost a host synchronisation or an extra collective run.

    On by default, so every direct call is checked. The training step runs its first step with
    them on and every later step with them off (`host_checks(False)`): the inputs of a run
    keep their shapes from step to step, and a GPU step that waits for the host each time
    cannot queue work ahead (the CUDA semantics notes on asynchronous execution).
    """
    return _CHECKS.get()


@contextmanager
def host_checks(enabled: bool) -> Iterator[None]:
    """Turn the checks of `checks_enabled` on or off inside the block (per thread/task).

    Every rank must use the same setting for the same call, since the shape check of `gather`
    is itself a collective."""
    token = _CHECKS.set(enabled)
    try:
        yield
    finally:
        _CHECKS.reset(token)


def global_offset(n_local: int) -> int:
    """Index of this rank's first row in a tensor gathered with `gather` (equal sizes per rank)."""
    return rank() * n_local


def _check_equal_shapes(t: Tensor) -> None:
    """Refuse ranks with different shapes on every rank at once (so none is left hanging)."""
    shape = torch.tensor(list(t.shape), dtype=torch.int64, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    torch_dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        per_rank = [tuple(s.tolist()) for s in shapes]
        raise ValueError(
            f"gather needs the same tensor shape on every rank, got {per_rank} (rank order); "
            "use equal per-rank batch sizes (drop_last=True in the data loader)"
        )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient over ranks and keeps this slice.

    Each rank's loss depends on every rank's rows, so the gradient of row block r is the sum of
    the gradients the W per-rank losses send it. With DDP's gradient averaging that makes W ranks
    equal to one process on the whole batch (SimCLR arXiv 2002.05709 global batch norm/negatives;
    solo-learn `GatherLayer`).
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        ws = world_size()
        ctx.n_local = t.shape[0]
        ctx.rank = rank()
        parts = [torch.empty_like(t) for _ in range(ws)]
        torch_dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)  # (W * n) x ...

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # all_reduce is in place; never touch autograd's buffer
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        start = ctx.rank * ctx.n_local
        return grad[start : start + ctx.n_local]


def gather(t: Tensor) -> Tensor:
    """Concatenate `t` (n x ...) from all ranks along dim 0, rank order: (W * n) x ....

    Gradients flow back to this rank's slice (see `_GatherWithGrad`). Identity without a process
    group or with one rank. Every rank must pass the same shape: ValueError otherwise, checked
    (with one extra all_gather) only while `checks_enabled()`.
    """
    if world_size() == 1:
        return t
    if checks_enabled():
        _check_equal_shapes(t)
    if not (t.requires_grad and torch.is_grad_enabled()):
        parts = [torch.empty_like(t) for _ in range(world_size())]
        torch_dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts, dim=0)
    out: Tensor = _GatherWithGrad.apply(t)
    return out


@torch.no_grad()
def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of `t` over ranks, as a new detached tensor (a copy of `t` without a process group)."""
    out = t.detach().clone()
    if world_size() > 1:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out


@torch.no_grad()
def all_reduce_max(t: Tensor) -> Tensor:
    """Element-wise maximum of `t` over ranks, as a new detached tensor."""
    out = t.detach().clone()
    if world_size() > 1:
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.MAX)
    return out


@torch.no_grad()
def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of `t` over ranks, as a new detached tensor (a copy of `t` without a process group).

    Integer inputs come back as floating point, since a mean of integers need not be one.
    """
    return all_reduce_sum(t) / world_size()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a process group): for
    host data gathered once in a while (a re-mining round's embeddings and pairs), never per step.
    """
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if is_dist():
        torch_dist.barrier()


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make ``module``'s parameters and buffers on every rank those of rank ``src`` (in place;
    nothing without a process group). DDP keeps parameters equal, not buffers: with
    ``broadcast_buffers=False`` each rank's BatchNorm running statistics are its own."""
    if not is_dist():
        return
    for t in module.state_dict(keep_vars=False).values():
        torch_dist.broadcast(t, src)


@torch.no_grad()
def all_gather_rows(t: Tensor) -> Tensor:
    """Every rank's rows of ``t`` (``N_r x ...``, ``N_r`` may differ between ranks) concatenated
    in rank order, on ``t``'s device (``t`` itself without a process group): one tensor
    collective, no pickling (a re-mining round's embeddings, up to gigabytes)."""
    if not is_dist():
        return t
    counts = [int(n) for n in all_gather_objects(int(t.shape[0]))]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in counts]
    torch_dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, counts, strict=True)])
