"""Two ranks: sepp's step under DDP with NCCL on the GPU (gloo on the CPU), both ranks on one
device when there is only one.

NCCL may refuse two ranks on one GPU (it checks for duplicate devices when it builds its
communicator); the part then records why it did not run instead of a figure. What it checks when
it runs: the step's throughput over both ranks, and that DDP left the parameters equal on both.
"""

from __future__ import annotations

import json
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from benchmarks.gpu_check.common import PartContext, device_batch, sepp_trainer, sizes, sync

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_device(rank: int) -> torch.device:
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # two ranks share the cores: no oversubscription
        return torch.device("cpu")
    d = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(d)
    return d


def _param_spread(method: torch.nn.Module) -> float:
    """Largest difference of any parameter between the ranks (0 when DDP kept them equal)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in method.parameters()])
    hi, lo = flat.clone(), flat.clone()
    torch_dist.all_reduce(hi, op=torch_dist.ReduceOp.MAX)
    torch_dist.all_reduce(lo, op=torch_dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())


def _train(rank: int, s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Steps of sepp's trainer under DDP on this rank's half of the batch."""
    local = s["batch"] // WORLD
    tr = sepp_trainer(s["backbone"], s["size"], device, ddp=True)
    b = device_batch(local, s["size"], device, seed=rank)
    for i in range(3):
        tr.train_step(b, 0, i)
    sync(device)
    torch_dist.barrier()
    t0 = time.perf_counter()
    for i in range(s["steps"]):
        tr.train_step(b, 0, 3 + i)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"pairs_per_s": WORLD * local * s["steps"] / seconds, "spread": _param_spread(tr.method)}


def rank_main(rank: int, port: int, tiny: bool, folder: str) -> None:
    """One rank (torch.multiprocessing.spawn's target): writes rank<r>.json, its figures or the
    error that stopped it, and never raises (so the other rank's error is read too)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    out: dict[str, Any] = {"backend": backend}
    try:
        device = _rank_device(rank)
        torch_dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
            timeout=timedelta(seconds=60),
        )  # fmt: skip
        out.update(_train(rank, sizes(tiny), device), device=str(device))
    except Exception as e:  # noqa: BLE001 (the reason is the figure)
        out["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        out["traceback"] = traceback.format_exc()[-3000:]
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(out, indent=1))


def ranks(ctx: PartContext) -> None:
    """Two DDP ranks (NCCL on CUDA, on one GPU when there is one; gloo on the CPU)."""
    import torch.multiprocessing as mp

    folder = ctx.out / "ranks"
    folder.mkdir(exist_ok=True)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    where = "cpu" if not gpus else ("one GPU" if gpus == 1 else f"{min(gpus, WORLD)} GPUs")
    mp.spawn(rank_main, args=(_free_port(), ctx.tiny, str(folder)), nprocs=WORLD, join=True)
    recs = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD)]
    backend = recs[0]["backend"]
    errors = [f"rank {r}: {x['error']}" for r, x in enumerate(recs) if "error" in x]
    label = f"two ranks ({backend}, {where})"
    if errors:
        why = "; ".join(errors)
        ctx.add(f"{label}: did not run", why[:600], "", "runs where the device allows", None)
        return
    ctx.add(f"{label}: sepp step", round(recs[0]["pairs_per_s"], 1), "pairs/s")
    spread = max(x["spread"] for x in recs)
    ctx.add(f"{label}: parameter spread across ranks", spread, "", "0", spread == 0.0)
