"""The parts of the GPU check. Each returns figures (`fig`) and runs in a process of its own.

Sizes: `full` is what the targets are stated for (one H100/H200, DESIGN.md "Measured ceilings");
`tiny` is the same code on inputs small enough for two CPU cores, to prove it runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
Figures = list[dict[str, Any]]


def fig(name: str, value: Any, unit: str = "", target: str = "", ok: bool | None = None) -> dict:
    """One figure of a part: `ok` None when it has no target (context for others)."""
    return {"name": name, "value": value, "unit": unit, "target": target, "ok": ok}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sizes(tiny: bool) -> dict[str, Any]:
    if tiny:
        return dict(backbone="test_resnet", size=16, batch=16, steps=4, n_images=128, workers=1)
    return dict(backbone="resnet18", size=32, batch=512, steps=30, n_images=16384, workers=16)


# --- gpu-marked tests ------------------------------------------------------------------------


def gpu_tests(tiny: bool, out: Path) -> Figures:
    """The `gpu`-marked tests (on CPU only collected: they need CUDA)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    cmd.append("--continue-on-collection-errors")
    if not torch.cuda.is_available():
        cmd.append("--collect-only")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    (out / "gpu_tests.log").write_text(r.stdout + r.stderr)
    last = (r.stdout.strip().splitlines() or ["no output"])[-1]
    return [fig("gpu tests", last, "", "all pass", r.returncode == 0)]


# --- host syncs per step and graph breaks ----------------------------------------------------


def _sepp_trainer(backbone: str, size: int, device: torch.device, compile_backend: str = "") -> Any:
    from sepp_ray.data.augment import GPUAugment
    from sepp_ray.data.recipes import get_recipe
    from sepp_ray.methods import create_method
    from sepp_ray.train.optim import build_optimizer
    from sepp_ray.train.step import StepConfig, Trainer, prepare_loss_module

    torch.manual_seed(0)
    cuda = device.type == "cuda"
    method = create_method("simclr", backbone=backbone, cifar_stem=True)
    module = prepare_loss_module(method, device, channels_last=cuda)
    model = torch.compile(module, backend=compile_backend) if compile_backend else module
    augment = GPUAugment(get_recipe("simclr", size), seed=0, channels_last=cuda)
    opt = build_optimizer("lars", method, 0.3, 1e-6)
    method.train()
    cfg = StepConfig(channels_last=cuda)
    return Trainer(model, method, augment, opt, cfg, 10_000, 10, base_lr=0.3)


def _device_batch(n: int, size: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g).to(device)
    return {"image": x, "image2": x, "id": torch.arange(n, device=device)}


def syncs(tiny: bool, out: Path) -> Figures:
    """Host syncs per step after the first (target 0) and per metrics read (target 1), and the
    graph breaks TorchDynamo finds in the loss module's forward."""
    from benchmarks.gpu_check.syncs import SyncCounter, cuda_sync_warnings

    s, device = _sizes(tiny), _device()
    trainer = _sepp_trainer(s["backbone"], s["size"], device)
    b = _device_batch(s["batch"], s["size"], device)
    trainer.train_step(b, 0, 0)
    counts, reads = [], []
    for step in range(1, 4):
        if device.type == "cuda":
            with cuda_sync_warnings() as found:
                trainer.train_step(b, 0, step)
            counts.append(len(found))
            with cuda_sync_warnings() as found:
                trainer.read_metrics()
            reads.append(len(found))
        else:
            c = SyncCounter()
            with c.counting():
                trainer.train_step(b, 0, step)
            counts.append(c.total())
            c = SyncCounter()
            with c.counting():
                trainer.read_metrics()
            reads.append(c.total())
    how = "set_sync_debug_mode" if device.type == "cuda" else "SyncCounter"
    figures = [
        fig(f"host syncs per step ({how})", max(counts), "", "0", max(counts) == 0),
        fig("host syncs per metrics read", max(reads), "", "<= 1", max(reads) <= 1),
    ]
    import torch._dynamo as dynamo

    from sepp_ray import dist

    views, ids, extra = trainer.views(b)
    dynamo.reset()
    with dist.host_checks(False):  # as every step after the first
        ex = dynamo.explain(trainer.loss_module)(views, ids, **extra)
    reasons = sorted({str(r.reason).splitlines()[0][:160] for r in ex.break_reasons})
    (out / "graph_breaks.txt").write_text("\n".join(reasons) + "\n")
    figures.append(fig("graph breaks in the loss module forward", ex.graph_break_count))
    figures += [fig(f"graph break {i + 1}", r) for i, r in enumerate(reasons[:8])]
    return figures


# --- training step throughput ----------------------------------------------------------------


def _bare_step(backbone: str, size: int, batch: int, device: torch.device, compile_: str) -> Any:
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


def _rate(step: Any, steps: int, items: int, device: torch.device, warm: int = 3) -> float:
    for _ in range(warm):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * items / (time.perf_counter() - t0)


def _sepp_step(s: dict[str, Any], device: torch.device, b: dict[str, Any], compiled: str) -> Any:
    tr = _sepp_trainer(s["backbone"], s["size"], device, compiled)
    it = iter(range(10**9))
    return lambda: tr.train_step(b, 0, next(it))


def step(tiny: bool, out: Path) -> Figures:
    """pairs/s of the bare step (eager, compiled), sepp's step (after; before = a metrics read
    and the input checks every step, as the step was) and a CPU torchvision DataLoader."""
    from benchmarks.pretrain import cpu_aug
    from sepp_ray import dist

    s, device = _sizes(tiny), _device()
    n, rows = s["batch"], {}
    rows["bare eager"] = _rate(
        _bare_step(s["backbone"], s["size"], n, device, ""), s["steps"], n, device
    )
    b = _device_batch(n, s["size"], device)
    rows["sepp step"] = _rate(_sepp_step(s, device, b, ""), s["steps"], n, device)
    tr = _sepp_trainer(s["backbone"], s["size"], device)
    it = iter(range(10**9))

    def before() -> None:  # the step before: checks, a metrics read, every step
        with dist.host_checks(True):
            tr.train_step(b, 0, next(it))
        tr.read_metrics()

    rows["sepp step, per-step reads (before)"] = _rate(before, s["steps"], n, device)
    images = np.random.default_rng(0).integers(0, 256, (max(4 * n, 256), s["size"], s["size"], 3))
    args = Namespace(
        backbone=s["backbone"], cifar_stem=True, compile=False, batch=n, steps=s["steps"],
        loader_workers=s["workers"],
    )  # fmt: skip
    rows["cpu torchvision aug DataLoader"] = cpu_aug(args, images.astype(np.uint8), device)
    base = rows["bare eager"]
    figures = [fig(k, round(v, 1), "pairs/s") for k, v in rows.items()]
    figures.append(
        fig("sepp step / bare eager", round(rows["sepp step"] / base, 3), "x", ">= 0.9",
            rows["sepp step"] >= 0.9 * base)
    )  # fmt: skip
    return figures


def compiled(tiny: bool, out: Path) -> Figures:
    """pairs/s of the bare step and of sepp's step under torch.compile (inductor; the tiny mode
    runs the compile path with the eager backend, not its kernels)."""
    s, device = _sizes(tiny), _device()
    backend, n = ("eager" if tiny else "inductor"), s["batch"]
    bare = _rate(_bare_step(s["backbone"], s["size"], n, device, backend), s["steps"], n, device)
    b = _device_batch(n, s["size"], device)
    ours = _rate(_sepp_step(s, device, b, backend), s["steps"], n, device)
    return [
        fig("bare compiled", round(bare, 1), "pairs/s"),
        fig("sepp step compiled", round(ours, 1), "pairs/s"),
        fig(
            "sepp compiled / bare compiled",
            round(ours / bare, 3),
            "x",
            ">= 0.9",
            ours >= 0.9 * bare,
        ),
    ]


# --- sepp through Ray Train ------------------------------------------------------------------


def _dataset(n: int, size: int, root: str) -> str:
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import SourceOptions, open_source

    uri = os.path.join(root, f"synthetic-{n}-{size}")
    opts = SourceOptions(n=n, size=size, chunk_size=min(n, 4096))
    ingest(open_source("synthetic", options=opts), uri)
    return uri


def ray_train(tiny: bool, out: Path) -> Figures:
    """Steady-state pairs/s of `sepp pretrain` (Ray Train, 1 worker; the first epoch warms up)."""
    from sepp_ray.train.driver import PretrainConfig, pretrain

    s = _sizes(tiny)
    root = tempfile.mkdtemp(prefix="sepp-gpu-check-")
    uri = _dataset(s["n_images"], s["size"], root)
    m = pretrain(
        PretrainConfig(
            dataset=uri, out=os.path.join(root, "run"), backbone=s["backbone"], cifar_stem=True,
            epochs=3, batch_size=s["batch"], warmup_epochs=1, knn_monitor=False,
            checkpoint_every=3, shuffle_buffer=0,
        )
    )  # fmt: skip
    steady = [h["pairs_per_s"] for h in m["history"][1:]] or [m["history"][0]["pairs_per_s"]]
    v = float(np.mean(steady))
    return [fig("sepp through Ray Train", round(v, 1), "pairs/s", ">= 24000", v >= 24000)]


# --- feed depth ------------------------------------------------------------------------------


def feed(tiny: bool, out: Path) -> Figures:
    """Batches/s and the share of time a simulated step waited for data, over read_ahead x
    prefetch_batches x pinned (`benchmarks.gpu_check.feed`), and whether the defaults come
    within 5% of the best setting. The full step is one of 512 pairs at the Ray Train target
    (24,000 pairs/s): the rate the feed must keep up with."""
    from benchmarks.gpu_check import feed as fd
    from sepp_ray.ray_utils import init_ray

    s, device = _sizes(tiny), _device()
    init_ray()
    root = tempfile.mkdtemp(prefix="sepp-gpu-check-")
    data = fd.open_plan(_dataset(s["n_images"], s["size"], root), s["batch"])
    step_ms = 10.0 if tiny else round(1000 * s["batch"] / 24000, 1)
    cuda = device.type == "cuda"
    rows = fd.run_grid(data, fd.grid(tiny, cuda), device, 2, step_ms / 1000, 1)
    v = fd.verdict(rows, fd.defaults(cuda))
    (out / "feed.md").write_text(fd.table(rows, step_ms))
    what = f"feed: simulated step (host sleep after the batch is on {device.type}), pin_ahead "
    figures = [fig(what + str(fd.pin_ahead()), step_ms, "ms")]
    for r in rows:
        label = fd.Setting.of(r).label()
        figures.append(fig(f"feed {label}: batches/s", r["batches_per_s"], "batches/s"))
        figures.append(fig(f"feed {label}: waited", r["wait_fraction"], "of time"))
    figures.append(fig("feed best setting", v["best"]))
    figures.append(
        fig(f"feed defaults ({v['defaults']}) / best", v["ratio"], "x", ">= 0.95", v["ok"])
    )
    return figures


# --- pair mining -----------------------------------------------------------------------------


def mining(tiny: bool, out: Path) -> Figures:
    """sepp's torch search of K = 5% anchors over N keys against a bare fp16 matmul + top-k."""
    from sepp_ray.mining import Vectors, build_searcher, choose_anchors

    device = _device()
    n, d, m = (8192, 64, 20) if tiny else (1_280_000, 2048, 20)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(n, d, device=device)
    for s in range(0, n, 131072):
        c = torch.randn(min(131072, n - s), d, generator=g, device=device)
        x[s : s + c.shape[0]] = F.normalize(c, dim=1)
    ids = np.arange(n, dtype=np.int64)
    anchors = choose_anchors(ids, 0.05, 0)
    q = x[torch.from_numpy(anchors).to(device)]
    _sync(device)
    t0 = time.perf_counter()
    searcher = build_searcher(Vectors(ids, x), "torch")
    searcher.search(Vectors(anchors, q), 0.96, 0.99, m)
    _sync(device)
    ours = time.perf_counter() - t0
    del searcher
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    k16, q16 = x.to(dtype), q.to(dtype)
    (q16[:64] @ k16[:1024].T).sum()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, q16.shape[0], 4096):
        (q16[s : s + 4096] @ k16.T).topk(m + 1, dim=1)
    _sync(device)
    bare = time.perf_counter() - t0
    return [
        fig(f"mining {n} x {d}, K = {len(anchors)}: sepp", round(ours, 3), "s"),
        fig("mining: bare matmul + top-k", round(bare, 3), "s"),
        fig("mining sepp / bare", round(ours / bare, 2), "x", "<= 2", ours <= 2 * bare),
    ]


# --- embedding -------------------------------------------------------------------------------


def embed(tiny: bool, out: Path) -> Figures:
    """images/s of ResNet-50 224 px embedding through Ray Data (`sepp embed`) and a bare loop."""
    from benchmarks.embed import bare
    from sepp_ray.data.dataset import ImageDataset
    from sepp_ray.data.decode import decode_blobs
    from sepp_ray.mining.embed import embed as sepp_embed
    from sepp_ray.mining.encoder import EncoderConfig
    from sepp_ray.ray_utils import init_ray

    model, size, n, batch = ("test_resnet", 16, 128, 32) if tiny else ("resnet50", 224, 4096, 256)
    root = tempfile.mkdtemp(prefix="sepp-gpu-check-")
    uri = _dataset(n, size, root)
    enc = EncoderConfig(name=model, image_size=size, batch_size=batch)
    table = ImageDataset.open(uri).read_table(["image"])
    images = decode_blobs(table["image"].to_pylist()[: min(n, 20 * batch)], size)
    bare_ips = bare(enc, images, batch, _device())
    init_ray()
    t = time.perf_counter()
    meta = sepp_embed(uri, os.path.join(root, "emb"), enc, overwrite=True)
    ours = meta["num_embeddings"] / (time.perf_counter() - t)
    return [
        fig(f"embedding {model} {size} px: bare loop", round(bare_ips, 1), "img/s"),
        fig("embedding through Ray Data", round(ours, 1), "img/s"),
        fig("embedding Ray Data / bare", round(ours / bare_ips, 3), "x", ">= 0.8",
            ours >= 0.8 * bare_ips),
    ]  # fmt: skip


# name -> (function, time limit s at full size, at tiny size), in the order they run: the main
# targets first, so a spent budget (8 minutes in all) cuts the least needed parts
PARTS: dict[str, tuple[Any, int, int]] = {
    "step": (step, 70, 180),
    "ray_train": (ray_train, 100, 300),
    "syncs": (syncs, 45, 180),
    "mining": (mining, 40, 120),
    "embed": (embed, 80, 300),
    "feed": (feed, 75, 120),  # picks the feed's depths: after the targets it serves
    "compiled": (compiled, 130, 240),
    "gpu_tests": (gpu_tests, 45, 120),
}
