"""Parts on the training step alone (no Ray): its throughput against a bare PyTorch step and the
classic CPU-augmentation loader, under torch.compile, and its host syncs and graph breaks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.gpu_check.common import (
    PartContext,
    device_batch,
    rate,
    sepp_trainer,
    sizes,
)


def bare_step(backbone: str, size: int, batch: int, device: torch.device, compile_: str) -> Any:
    """Plain PyTorch SimCLR: model, NT-Xent, SGD on views already on the device (no sepp)."""
    from sepp_ray.models.backbones import create_backbone

    torch.manual_seed(0)
    cuda = device.type == "cuda"
    net, dim = create_backbone(backbone, cifar_stem=True)  # the timm model, CIFAR stem
    head = torch.nn.Sequential(
        torch.nn.Linear(dim, 2048), torch.nn.BatchNorm1d(2048), torch.nn.ReLU(),
        torch.nn.Linear(2048, 128),
    )  # fmt: skip
    model = torch.nn.Sequential(net, head).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model, backend=compile_) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    x = torch.randn(2 * batch, 3, size, size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(2 * batch, device=device).roll(batch)
    eye = torch.eye(2 * batch, dtype=torch.bool, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            z = F.normalize(fwd(x).float(), dim=1)
        logits = (z @ z.T / 0.2).masked_fill(eye, float("-inf"))
        F.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sepp_step(s: dict[str, Any], device: torch.device, b: dict[str, Any], compiled: str) -> Any:
    tr = sepp_trainer(s["backbone"], s["size"], device, compiled)
    it = iter(range(10**9))
    return lambda: tr.train_step(b, 0, next(it))


def _cpu_aug(ctx: PartContext, s: dict[str, Any]) -> None:
    """The CPU torchvision-augmentation DataLoader: alone, and feeding sepp's model and loss
    (`benchmarks.gpu_check.loader`: steady batches only, after the workers' prefetch)."""
    from benchmarks.gpu_check.loader import LoaderPlan, make_loader, steady_rate, step_consumer

    device, n = ctx.device, s["batch"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(4 * n, 256), s["size"], s["size"], 3), dtype=np.uint8)
    plan = LoaderPlan(workers=s["workers"])
    alone, timed = steady_rate(
        iter(make_loader(images, n, plan, device)), plan, n, lambda b: None, device
    )
    what = f"{s['workers']} workers, {timed} steady batches after {plan.drain} drained"
    ctx.add(f"cpu torchvision aug DataLoader alone ({what})", round(alone, 1), "pairs/s")
    consume = step_consumer(sepp_trainer(s["backbone"], s["size"], device), device)
    fed, _ = steady_rate(iter(make_loader(images, n, plan, device)), plan, n, consume, device)
    ctx.add("cpu torchvision aug DataLoader", round(fed, 1), "pairs/s")


def step(ctx: PartContext) -> None:
    """pairs/s of the bare step (eager), sepp's step (after; before = a metrics read and the
    input checks every step, as the step was) and the CPU torchvision DataLoader baseline."""
    from sepp_ray import dist

    s, device = sizes(ctx.tiny), ctx.device
    n = s["batch"]
    base = rate(bare_step(s["backbone"], s["size"], n, device, ""), s["steps"], n, device)
    ctx.add("bare eager", round(base, 1), "pairs/s")
    b = device_batch(n, s["size"], device)
    ours = rate(sepp_step(s, device, b, ""), s["steps"], n, device)
    ctx.add("sepp step", round(ours, 1), "pairs/s")
    ctx.add("sepp step / bare eager", round(ours / base, 3), "x", ">= 0.9", ours >= 0.9 * base)
    tr = sepp_trainer(s["backbone"], s["size"], device)
    it = iter(range(10**9))

    def before() -> None:  # the step before: checks, a metrics read, every step
        with dist.host_checks(True):
            tr.train_step(b, 0, next(it))
        tr.read_metrics()

    slow = rate(before, s["steps"], n, device)
    ctx.add("sepp step, per-step reads (before)", round(slow, 1), "pairs/s")
    _cpu_aug(ctx, s)


def compiled(ctx: PartContext) -> None:
    """pairs/s of the bare step and of sepp's step under torch.compile (inductor; the tiny mode
    runs the compile path with the eager backend, not its kernels)."""
    s, device = sizes(ctx.tiny), ctx.device
    backend, n = ("eager" if ctx.tiny else "inductor"), s["batch"]
    bare = rate(bare_step(s["backbone"], s["size"], n, device, backend), s["steps"], n, device)
    ctx.add("bare compiled", round(bare, 1), "pairs/s")
    b = device_batch(n, s["size"], device)
    ours = rate(sepp_step(s, device, b, backend), s["steps"], n, device)
    ctx.add("sepp step compiled", round(ours, 1), "pairs/s")
    ok = ours >= 0.9 * bare
    ctx.add("sepp compiled / bare compiled", round(ours / bare, 3), "x", ">= 0.9", ok)


def _count_syncs(trainer: Any, b: dict[str, Any], device: torch.device) -> tuple[int, int]:
    """Host syncs of one step and of one metrics read (the most over three steps)."""
    from benchmarks.gpu_check.syncs import SyncCounter, cuda_sync_warnings

    def count(fn: Any, *args: Any) -> int:
        if device.type == "cuda":
            with cuda_sync_warnings() as found:
                fn(*args)
            return len(found)
        c = SyncCounter()
        with c.counting():
            fn(*args)
        return c.total()

    counts, reads = [], []
    for i in range(1, 4):  # a step, then a read, as a training loop does
        counts.append(count(trainer.train_step, b, 0, i))
        reads.append(count(trainer.read_metrics))
    return max(counts), max(reads)


def syncs(ctx: PartContext) -> None:
    """Host syncs per step after the first (target 0) and per metrics read (target 1), and the
    graph breaks TorchDynamo finds in the loss module's forward."""
    import torch._dynamo as dynamo

    from sepp_ray import dist

    s, device = sizes(ctx.tiny), ctx.device
    trainer = sepp_trainer(s["backbone"], s["size"], device)
    b = device_batch(s["batch"], s["size"], device)
    trainer.train_step(b, 0, 0)
    per_step, per_read = _count_syncs(trainer, b, device)
    how = "set_sync_debug_mode" if device.type == "cuda" else "SyncCounter"
    ctx.add(f"host syncs per step ({how})", per_step, "", "0", per_step == 0)
    ctx.add("host syncs per metrics read", per_read, "", "<= 1", per_read <= 1)
    views, ids, extra = trainer.views(b)
    dynamo.reset()
    with dist.host_checks(False):  # as every step after the first
        ex = dynamo.explain(trainer.loss_module)(views, ids, **extra)
    reasons = sorted({str(r.reason).splitlines()[0][:160] for r in ex.break_reasons})
    (ctx.out / "graph_breaks.txt").write_text("\n".join(reasons) + "\n")
    ctx.add("graph breaks in the loss module forward", ex.graph_break_count)
    for i, r in enumerate(reasons[:8]):
        ctx.add(f"graph break {i + 1}", r)
