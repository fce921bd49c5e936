"""Two gloo ranks on half a batch each equal one process on the whole batch, for every method.

This checks that methods talk across ranks only through `sepp_ray.dist` and do it right:
gathered keys and ids, global positives, queues filled identically on every rank. BN runs in
eval mode (running statistics), the one thing that legitimately differs per rank in train mode.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from test_methods import labels_for, linked_pos_ids, make_views, tiny  # noqa: E402

from sepp_ray.methods import list_methods, method_class  # noqa: E402

N, STEPS = 8, 2
# every method with the richest pair use it takes, and the cancelling ones once more
CASES = [
    (name, "attract" if "attract" in method_class(name).pair_uses else "none")
    for name in list_methods()
] + [(name, "cancel") for name in list_methods() if "cancel" in method_class(name).pair_uses]


def run_steps(name: str, use: str, rank: int, world: int) -> tuple[list[float], list[torch.Tensor]]:
    """STEPS SGD steps on this rank's slice; returns per-step losses (averaged over ranks) and
    the final backbone parameters."""
    m = tiny(name).eval()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    views, ids = make_views(N)
    mined = linked_pos_ids(N)
    labels = labels_for(m, N)
    part = slice(rank * N // world, (rank + 1) * N // world)
    kw = {
        "pos_ids": mined[part] if use == "attract" else None,
        "cancel_ids": mined[part] if use == "cancel" else None,
        "labels": None if labels is None else labels[part],
    }
    losses = []
    for step in range(STEPS):
        # same ids each step: step 2 finds step 1's keys of the same images in the queues
        loss, _ = m.training_loss([v[part] for v in views], ids[part], **kw)
        opt.zero_grad()
        loss.backward()
        if world > 1:  # what DDP does: average gradients
            for p in m.parameters():
                if p.grad is not None:
                    torch_dist.all_reduce(p.grad)
                    p.grad /= world
            torch_dist.all_reduce(loss_sum := loss.detach().clone())
            loss = loss_sum / world
        opt.step()
        m.on_train_step_end((step + 1) / STEPS)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in m.backbone.parameters()]


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {case: run_steps(*case, rank, world) for case in CASES}
        if rank == 0:
            torch.save(result, out)
    finally:
        torch_dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist.pt"
    mp.spawn(worker, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in CASES:
            losses, params = run_steps(*case, 0, 1)
            msg = str(case)
            torch.testing.assert_close(got[case][0], losses, rtol=1e-4, atol=1e-5, msg=msg)
            for a, b in zip(got[case][1], params, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=msg)
    finally:
        torch.set_num_threads(before)
