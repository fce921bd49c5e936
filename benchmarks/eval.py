"""Time of the feature-based evaluation protocols: weighted kNN and the linear-probe sweep.

    python benchmarks/eval.py                         # 50,000 x 512, 10 classes, CPU (+ CUDA)
    python benchmarks/eval.py --n 50000 --dim 2048 --epochs 100

Train features: N x D standard normal, test features: M x D, labels uniform over C classes
(random, so accuracies must sit at chance: a sanity check, printed alongside). kNN: k=200,
t=0.07, all M queries against all N keys. Linear probe: the full protocol of
`sepp_ray.eval.linear` (sweep of the learning rates on a held-out 10%, refit at the best, test).
One Markdown row per device; CUDA rows only when a GPU is present.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from sepp_ray.eval.linear import LinearProbeConfig, linear_probe
from sepp_ray.models.knn import knn_classify

HEADER = (
    "| date | device | N | M | D | C | kNN s | kNN top-1 | linear s (epochs x lrs) | linear top-1 |"
)
RULE = "|---|---|---|---|---|---|---|---|---|---|"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(device: torch.device, n: int, m: int, dim: int, classes: int, epochs: int) -> str:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g).to(device)
    y = torch.randint(0, classes, (n,), generator=g).to(device)
    tx = torch.randn(m, dim, generator=g).to(device)
    ty = torch.randint(0, classes, (m,), generator=g).to(device)
    knn_classify(x[:1000], y[:1000], tx[:100], ty[:100], classes)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    knn = knn_classify(x, y, tx, ty, classes, k=200, temperature=0.07)
    _sync(device)
    t1 = time.perf_counter()
    cfg = LinearProbeConfig(epochs=epochs)
    lin = linear_probe(x, y, tx, ty, classes, cfg)
    _sync(device)
    t2 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    cpus = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return (
        f"| {datetime.date.today()} | {device.type} ({name or 'cpu'}{cpus}) | {n} | {m} | {dim} "
        f"| {classes} | {t1 - t0:.2f} | {100 * knn['top1']:.1f} | {t2 - t1:.2f} "
        f"({epochs} x {len(cfg.lrs)} + refit) | {100 * float(lin['top1']):.1f} |"  # type: ignore[arg-type]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000, help="training features")
    p.add_argument("--m", type=int, default=10_000, help="test features")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; on a shared machine 1 is steadier: a busy "
        "core stalls every multi-threaded small op at its barrier)",
    )
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not a.cpu_only:
        devices.append(torch.device("cuda"))
    print(HEADER)
    print(RULE)
    for dev in devices:
        print(run(dev, a.n, a.m, a.dim, a.classes, a.epochs), flush=True)


if __name__ == "__main__":
    main()
