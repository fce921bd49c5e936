"""No host synchronisation between logging intervals: every step after the first runs without a
read of a device value, and a logging interval costs one read (`Trainer.read_metrics`).

Counted on CPU by `benchmarks.gpu_check.syncs.SyncCounter`: the aten ops that wait for a GPU
(`.item()`, `bool()`, `nonzero`, ...), `tolist` / `numpy`, and collectives called from Python.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from benchmarks.gpu_check.syncs import SyncCounter
from sepp_ray.data.augment import GPUAugment
from sepp_ray.data.recipes import get_recipe
from sepp_ray.methods import list_methods
from sepp_ray.train import StepConfig, Trainer, build_optimizer, prepare_loss_module, train_epoch
from tests.test_train_step import SIZE, batch, make_trainer, one_thread, tiny  # noqa: F401

EXTRA = {"dino": {"out_dim": 64, "bottleneck_dim": 32}}
USE = {"simclr": "attract", "nnclr": "cancel"}


def _trainer(name: str, **cfg: Any) -> Trainer:
    opt = "lars" if name in ("simclr", "nnclr") else "sgd"
    return make_trainer(
        tiny(name, **EXTRA.get(name, {})), opt=opt, lr=0.05, pair_use=USE.get(name, "none"), **cfg
    )


def _batch(seed: int) -> dict[str, torch.Tensor]:
    b = batch(seed=seed, pair=True)
    b["label"] = torch.arange(len(b["id"])) % 3
    return b


@pytest.mark.parametrize("name", list_methods())
def test_no_host_sync_after_the_first_step(name: str) -> None:
    trainer = _trainer(name, grad_clip=1.0)
    per_step = []
    for s in range(4):
        counter = SyncCounter()
        with counter.counting():
            trainer.train_step(_batch(s), 0, s)
        per_step.append(dict(counter.seen))
    assert all(not seen for seen in per_step[1:]), per_step
    counter = SyncCounter()
    with counter.counting():
        out = trainer.read_metrics()
    assert dict(counter.seen) == {"Tensor.tolist": 1} and out["steps"] == 4


def test_the_counter_sees_syncs() -> None:
    """The check can fail: the old step's reads (`loss.item()`, a bool) are counted."""
    counter = SyncCounter()
    x = torch.ones(3)
    with counter.counting():
        x.sum().item()
        bool(x.any())
        x.tolist()
        x[x > 0].sum()  # boolean indexing: nonzero
    assert counter.total() >= 4 and counter.seen["aten._local_scalar_dense"] == 2
    trainer = _trainer("simclr")
    counter = SyncCounter()
    with counter.counting():  # the first step checks its inputs: has_pos.any() among them
        trainer.train_step(_batch(0), 0, 0)
    assert counter.seen["aten._local_scalar_dense"] >= 1


def test_train_epoch_reads_once_per_interval() -> None:
    trainer = _trainer("simclr")
    trainer.train_step(_batch(0), 0, 0)
    trainer.read_metrics()
    steps: list[int] = []
    seen: list[int] = []  # the global step of each read
    step, read = trainer.train_step, trainer.read_metrics

    def train_step(batch: dict[str, Any], epoch: int, at: int) -> Any:
        steps.append(at)
        return step(batch, epoch, at)

    def read_metrics() -> dict[str, float]:
        seen.append(steps[-1])
        return read()

    trainer.train_step = train_step  # type: ignore[method-assign]
    trainer.read_metrics = read_metrics  # type: ignore[method-assign]
    counter = SyncCounter()
    with counter.counting():
        train_epoch(trainer, [_batch(s) for s in range(6)], 0, 1, log_every=2)
    assert seen == [2, 4, 6] and dict(counter.seen) == {"Tensor.tolist": 3}


# --- two gloo ranks: the shape checks' collectives run on the first step only ----------------


def _collectives(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        method = tiny()
        model = DistributedDataParallel(prepare_loss_module(method, "cpu"))
        augment = GPUAugment(get_recipe("simclr", SIZE), seed=rank)
        opt = build_optimizer("lars", method, lr=0.1, weight_decay=1e-6)
        trainer = Trainer(model, method, augment, opt, StepConfig(), 10, 1, base_lr=0.1)
        counts = []
        for s in range(3):
            counter = SyncCounter()
            with counter.counting():
                trainer.train_step(_batch(s), 0, s)
            counts.append(dict(counter.seen))
        counter = SyncCounter()
        with counter.counting():
            trainer.read_metrics()
        counts.append(dict(counter.seen))
        if rank == 0:
            torch.save(counts, out)
    finally:
        torch_dist.destroy_process_group()


def test_collectives_per_step_two_ranks(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "counts.pt"
    mp.spawn(_collectives, args=(2, port, str(out)), nprocs=2, join=True)
    first, second, third, read = torch.load(out)
    # SimCLR gathers its embeddings and ids (2 all_gathers); the backward of the embeddings'
    # gather is one all_reduce (DDP's own bucket all-reduces run in C++, not counted here)
    assert second == third == {"dist.all_gather": 2, "dist.all_reduce": 1}, (second, third)
    assert first["dist.all_gather"] == 4  # + one shape check per gather, on the first step
    assert read == {"dist.all_reduce": 2, "Tensor.tolist": 1}
