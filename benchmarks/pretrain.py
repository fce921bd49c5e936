"""Pretraining throughput (pairs/s), three pipelines side by side in one run:

1. bare: our training step (device augmentation + method + optimizer) on uint8 batches already
   on the device, no data loading, no Ray: the ceiling of this code on this machine; next to
   it the same step as it was before it lost its host syncs (input checks and a metrics read
   every step), alternated with it in rounds so both see the same machine load;
2. ray: `sepp pretrain` through Ray Train on an ingested dataset (1 worker with every core, as
   the bare step has), steady-state epochs only (the first is warm-up), once with the split
   held in memory (`data_plane=resident`) and once streamed (`stream`, one core left to the
   decode tasks);
3. cpu-aug: the classic pipeline, torchvision augmentation per image in DataLoader workers on
   the CPU, feeding the same model step.

    python benchmarks/pretrain.py --dataset runs/cifar10 --backbone resnet18 --cifar-stem \
        --batch 512 --epochs 3            # on a GPU machine
    python benchmarks/pretrain.py --dataset runs/digits --backbone test_resnet --batch 64
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from benchmarks.gpu_check.loader import TorchvisionPairs
from sepp_ray.data.augment import GPUAugment
from sepp_ray.data.dataset import ImageDataset
from sepp_ray.data.recipes import get_recipe
from sepp_ray.methods import create_method
from sepp_ray.train.driver import PretrainConfig, pretrain
from sepp_ray.train.optim import build_optimizer
from sepp_ray.train.step import StepConfig, Trainer, prepare_loss_module


def _trainer(args: argparse.Namespace, size: int, device: torch.device) -> Trainer:
    torch.manual_seed(0)
    method = create_method("simclr", backbone=args.backbone, cifar_stem=args.cifar_stem)
    module = prepare_loss_module(method, device, channels_last=device.type == "cuda")
    if args.compile:
        module = torch.compile(module)  # type: ignore[assignment]
    augment = GPUAugment(get_recipe("simclr", size), seed=0, channels_last=device.type == "cuda")
    opt = build_optimizer("lars", method, 0.3, 1e-6)
    method.train()
    return Trainer(
        module,
        method,
        augment,
        opt,
        StepConfig(channels_last=device.type == "cuda"),
        total_steps=10_000,
        warmup_steps=10,
        base_lr=0.3,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare(args: argparse.Namespace, images: np.ndarray, device: torch.device) -> tuple[float, float]:
    """pairs/s of the step as it is, and as it was (per-step checks and metrics read)."""
    from sepp_ray import dist

    x = torch.from_numpy(images[: args.batch]).to(device)
    batch = {
        "image": x,
        "image2": x,
        "id": torch.arange(args.batch, device=device),
        "pos_ids": torch.full((args.batch, 1), -1, device=device),
        "view_ids": torch.arange(args.batch, device=device)[:, None].repeat(1, 2),
        "group": torch.full((args.batch,), -1, device=device),
    }
    trainers = {"now": _trainer(args, images.shape[1], device)}
    trainers["before"] = _trainer(args, images.shape[1], device)
    steps = dict.fromkeys(trainers, 0)
    seconds = dict.fromkeys(trainers, 0.0)

    def run(name: str, n: int) -> None:
        tr = trainers[name]
        for _ in range(n):
            if name == "before":
                with dist.host_checks(True):
                    tr.train_step(batch, 0, steps[name])
                tr.read_metrics()
            else:
                tr.train_step(batch, 0, steps[name])
            steps[name] += 1
        if name == "now":
            tr.read_metrics()  # one read per interval

    for name in trainers:
        run(name, 3)  # warm-up
    rounds = 3
    for _ in range(rounds):
        for name in trainers:
            _sync(device)
            t0 = time.perf_counter()
            run(name, max(1, args.steps // rounds))
            _sync(device)
            seconds[name] += time.perf_counter() - t0
    n = rounds * max(1, args.steps // rounds) * args.batch
    return n / seconds["now"], n / seconds["before"]


def cpu_aug(args: argparse.Namespace, images: np.ndarray, device: torch.device) -> float:
    from sepp_ray.train.step import LossModule

    tr = _trainer(args, images.shape[1], device)
    loss_module: LossModule = tr.loss_module
    loader = torch.utils.data.DataLoader(
        TorchvisionPairs(images),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.loader_workers,
        persistent_workers=args.loader_workers > 0,
        pin_memory=device.type == "cuda",
    )
    opt = tr.optimizer
    n, t0 = 0, 0.0
    for step, (v1, v2, ids) in enumerate(loader):
        if step == 2:
            _sync(device)
            t0 = time.perf_counter()
        v1, v2, ids = v1.to(device), v2.to(device), ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_module([v1, v2], ids, None, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            n += args.batch
        if step >= args.steps + 1:
            break
    _sync(device)
    return n / (time.perf_counter() - t0)


def ray_train(args: argparse.Namespace, plane: str) -> float:
    """Steady-state pairs/s of `sepp pretrain` (1 worker; the first epoch is warm-up). The
    worker gets every core (as many torch threads as the bare step), less one for the decode
    tasks when the data streams."""
    cores = os.cpu_count() or 1
    out = os.path.join(tempfile.mkdtemp(prefix="sepp-bench-pt-"), "run")
    m = pretrain(
        PretrainConfig(
            dataset=args.dataset,
            out=out,
            backbone=args.backbone,
            cifar_stem=args.cifar_stem,
            epochs=args.epochs,
            batch_size=args.batch,
            warmup_epochs=1,
            knn_monitor=False,
            checkpoint_every=args.epochs,
            compile=args.compile,
            shuffle_buffer=0,
            data_plane=plane,
            cpus_per_worker=float(cores if plane == "resident" else max(1, cores - 1)),
        )
    )
    steady = [h["pairs_per_s"] for h in m["history"][1:]] or [m["history"][0]["pairs_per_s"]]
    return float(np.mean(steady))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True, help="an ingested dataset URI")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--cifar-stem", action="store_true")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=3, help="Ray Train epochs (first = warm-up)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--loader-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument(
        "--data-plane", nargs="+", default=["resident", "stream"], choices=["resident", "stream"]
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = ImageDataset.open(args.dataset)
    from sepp_ray.data.decode import decode_blobs

    size = int(ds.manifest["image_size"]["width"][0])
    table = ds.read_table(["image"], split="train", limit=max(4 * args.batch, 2048))
    images = decode_blobs(table["image"].to_pylist(), size).permute(0, 2, 3, 1).contiguous().numpy()
    now, before = bare(args, images, device)
    rows = {
        "bare step (device aug)": now,
        "bare step, per-step checks and metrics read (before)": before,
        "cpu torchvision aug DataLoader": cpu_aug(args, images, device),
    }
    for plane in [] if args.skip_ray else args.data_plane:
        rows[f"ray train (1 worker, {plane})"] = ray_train(args, plane)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    print(
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, GPU {gpu}, torch "
        f"{torch.__version__}; simclr {args.backbone} cifar_stem={args.cifar_stem} "
        f"{size}px batch {args.batch}"
    )
    base = rows["bare step (device aug)"]
    print("| pipeline | pairs/s | vs bare step |")
    print("|---|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {v:,.0f} | {v / base:.2f} |")


if __name__ == "__main__":
    main()
