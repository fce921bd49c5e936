"""Semantic-pair mining time versus N for each search backend (arXiv 2306.16122 sampler).

    python benchmarks/mining.py                                   # CPU sweep, under a minute
    python benchmarks/mining.py --n 100000 200000 --dim 512 --backend faiss-flat faiss-ivf torch
    python benchmarks/mining.py --check on                        # needs CUDA (auto: if present)

Each row: prepare (key validation, device upload / index build) and search (query validation,
search, exact top-m selection) seconds on synthetic clustered unit vectors whose within-cluster
similarities straddle [0.96, 0.99], so in-range pairs, ties and near-duplicates all occur.
The CUDA check times the torch backend on 1.28M x 2048 random unit vectors with K = 5% anchors
against a bare fp16 matmul + topk over the same tensors, in the same run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sepp_ray.mining import Pairs, Vectors, available_backends, build_searcher, choose_anchors

HEADER = "| backend | device | N | D | K | m | prepare s | search s | total s | pairs | recall |"
RULE = "|---|---|---|---|---|---|---|---|---|---|---|"


def clustered(n: int, dim: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """[n, dim] unit vectors in clusters of ~20 whose pair similarity is mostly 0.94-0.995."""
    g = torch.Generator(device=device).manual_seed(seed)
    centers = torch.randn(max(1, n // 20), dim, generator=g, device=device)
    which = torch.randint(0, centers.shape[0], (n,), generator=g, device=device)
    # pair cos ~ 1 / (1 + sigma^2 dim): sigma^2 dim in ~[0.005, 0.06] per cluster
    spread = torch.empty(centers.shape[0], device=device).uniform_(0.005, 0.06, generator=g)
    sigma = (spread / dim).sqrt()[which].unsqueeze(1)  # [n, 1]
    centers = centers / centers.norm(dim=1, keepdim=True)
    x = centers[which] + sigma * torch.randn(n, dim, generator=g, device=device)
    return x / x.norm(dim=1, keepdim=True)


def time_backend(name: str, keys: Vectors, queries: Vectors, m: int) -> tuple[float, float, Pairs]:
    t0 = time.perf_counter()
    searcher = build_searcher(keys, name)
    t1 = time.perf_counter()
    pairs = searcher.search(queries, 0.96, 0.99, m)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, pairs


def recall(got: Pairs, truth: Pairs) -> float:
    """Share of the exact (anchor, positive) pairs that `got` found."""
    a = set(zip(truth.anchor_id.tolist(), truth.positive_id.tolist(), strict=True))
    b = set(zip(got.anchor_id.tolist(), got.positive_id.tolist(), strict=True))
    return len(a & b) / max(1, len(a))


def row(name: str, device: str, n: int, d: int, k: int, m: int, prep: float, srch: float,
        pairs: int | str, rec: str) -> str:  # fmt: skip
    return f"| {name} | {device} | {n} | {d} | {k} | {m} | {prep:.2f} | {srch:.2f} | " \
           f"{prep + srch:.2f} | {pairs} | {rec} |"  # fmt: skip


def sweep(args: argparse.Namespace) -> None:
    names = available_backends() if args.backend == ["all"] else args.backend
    warm = Vectors(np.arange(64), clustered(64, 8, 0).numpy())
    for name in names:  # first-call costs (imports, thread pools) stay out of the rows
        build_searcher(warm, name).search(warm, 0.96, 0.99)
    for n in args.n:
        x = clustered(n, args.dim, args.seed).numpy()
        keys = Vectors(np.arange(n, dtype=np.int64), x)
        anchors = choose_anchors(keys.ids, args.k_frac, args.seed)
        queries = keys.take(anchors)  # ids are positions here
        truth: Pairs | None = None  # first exact backend's pairs, to score approximate ones
        for name in sorted(names, key=lambda b: b not in available_backends(exact=True)):
            dev = "cuda" if name == "torch" and torch.cuda.is_available() else "cpu"
            prep, srch, pairs = time_backend(name, keys, queries, args.m)
            exact = name in available_backends(exact=True)
            truth = pairs if exact and truth is None else truth
            rec = "exact" if exact else "-" if truth is None else f"{recall(pairs, truth):.3f}"
            line = row(name, dev, n, args.dim, len(anchors), args.m, prep, srch, len(pairs), rec)
            print(line, flush=True)


def cuda_check(args: argparse.Namespace) -> None:
    """Our torch backend versus a bare fp16 matmul + topk, same tensors, same run."""
    dev, n, d = torch.device("cuda"), args.check_n, args.check_dim
    g = torch.Generator(device=dev).manual_seed(args.seed)
    x = torch.empty(n, d, device=dev)  # [N, D] fp32 unit rows, generated in chunks
    for s in range(0, n, 131072):
        c = torch.randn(min(131072, n - s), d, generator=g, device=dev)
        x[s : s + c.shape[0]] = c / c.norm(dim=1, keepdim=True)
    ids = np.arange(n, dtype=np.int64)
    anchors = choose_anchors(ids, args.k_frac, args.seed)
    q = x[torch.from_numpy(anchors).to(dev)]  # [K, D]
    torch.mm(q[:256].half(), x[:4096].half().T).sum().item()  # cuBLAS warm-up

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    searcher = build_searcher(Vectors(ids, x), "torch")
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    pairs = searcher.search(Vectors(anchors, q), 0.96, 0.99, args.m)
    t2 = time.perf_counter()
    print(
        row(
            "torch (ours)",
            "cuda",
            n,
            d,
            len(anchors),
            args.m,
            t1 - t0,
            t2 - t1,
            len(pairs),
            "exact",
        )
    )
    del searcher

    k16, q16 = x.half(), q.half()
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    for s in range(0, q16.shape[0], 4096):
        sims = q16[s : s + 4096] @ k16.T  # [4096, N] fp16
        sims.topk(args.m + 1, dim=1)
    torch.cuda.synchronize()
    bare = time.perf_counter() - t3
    print(row("bare fp16 mm+topk", "cuda", n, d, len(anchors), args.m, 0.0, bare, "-", "-"))
    print(f"\nours / bare search time: {(t2 - t1) / bare:.2f}x on {torch.cuda.get_device_name()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, nargs="*", default=[10000, 20000, 40000], help="none: skip")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k-frac", type=float, default=0.05)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--backend", nargs="+", default=["all"], help="names, or all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--check-n", type=int, default=1_281_167)
    p.add_argument("--check-dim", type=int, default=2048)
    args = p.parse_args()
    print(f"torch threads {torch.get_num_threads()}\n\n{HEADER}\n{RULE}")
    if args.n:
        sweep(args)
    if args.check == "on" or (args.check == "auto" and torch.cuda.is_available()):
        cuda_check(args)


if __name__ == "__main__":
    main()
