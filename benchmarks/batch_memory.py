"""Peak memory of one training step against the local batch, and the largest local batch that
fits a 40 GB and an 80 GB A100: the per-GPU batch guidance of the README.

The step is the pre-flight check's (`sepp_ray.train.preflight.step_peak`): the Trainer's views,
autocast and loss, forward and backward. On CUDA the figure is the allocator's peak; on a CPU it
is the tensors saved for backward plus weights and gradients (an estimate: no cuDNN workspace,
no allocator fragmentation). Memory grows linearly with the batch, so two batches give the
fixed part and the part per item; the optimizer's state (one momentum buffer, 1x the weights)
is added, and 10 % of the device is left as headroom.

    python -m benchmarks.batch_memory --backbone resnet50 --size 224 --batches 2 4      # CPU
    python -m benchmarks.batch_memory --backbone resnet50 --size 224 --batches 64 128 \\
        --device cuda                                                                  # GPU
"""

from __future__ import annotations

import argparse
import platform

import torch

from sepp_ray.data.augment import GPUAugment
from sepp_ray.data.recipes import get_recipe
from sepp_ray.methods import create_method
from sepp_ray.train.optim import build_optimizer
from sepp_ray.train.preflight import GiB, step_peak
from sepp_ray.train.step import StepConfig, Trainer, prepare_loss_module

HEADROOM = 0.9
DEVICES_GB = {"A100 40 GB": 40e9, "A100 80 GB": 80e9}


def trainer(args: argparse.Namespace, device: torch.device) -> Trainer:
    torch.manual_seed(0)
    m = create_method(args.method, backbone=args.backbone, cifar_stem=args.cifar_stem)
    cuda = device.type == "cuda"
    module = prepare_loss_module(m, device, channels_last=cuda)
    augment = GPUAugment(get_recipe(m.default_recipe, args.size), seed=0, channels_last=cuda)
    opt = build_optimizer("sgd", m, lr=0.1, weight_decay=0.0)
    cfg = StepConfig(amp=args.amp, channels_last=cuda)
    return Trainer(module, m, augment, opt, cfg, 10, 1, base_lr=0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="simclr")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--cifar-stem", action="store_true")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs=2, default=[2, 4])
    p.add_argument("--amp", default="bf16", help="bf16 (the GPU default) or off")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t = trainer(args, device)
    weights = sum(q.numel() * q.element_size() for q in t.method.parameters())
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"{args.method} {args.backbone} {args.size} px, amp {args.amp}, {device.type} ({where}), "
        f"weights {weights / GiB:.3f} GiB"
    )
    print("| local batch | peak GiB |\n|---|---|")
    peaks = []
    for b in args.batches:
        peaks.append(step_peak(t, b, args.size))
        t.method.zero_grad(set_to_none=True)
        print(f"| {b} | {peaks[-1] / GiB:.3f} |")
    (b0, b1), (m0, m1) = args.batches, peaks
    per_item = (m1 - m0) / (b1 - b0)
    fixed = m0 - per_item * b0 + weights  # + one momentum buffer
    print(f"\nper item {per_item / 2**20:.1f} MiB, fixed {fixed / GiB:.2f} GiB (with momentum)")
    print("| device | largest local batch (90 % of memory) |\n|---|---|")
    for name, total in DEVICES_GB.items():
        print(f"| {name} | {int((HEADROOM * total - fixed) // per_item)} |")


if __name__ == "__main__":
    main()
