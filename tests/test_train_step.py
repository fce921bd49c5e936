"""The framework-free training step on CPU: tiny timm `test_resnet` (CIFAR stem), 16 px images."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from sepp_ray.data.augment import GPUAugment
from sepp_ray.data.recipes import IMAGENET_MEAN, IMAGENET_STD, OPS, get_recipe
from sepp_ray.errors import SeppError
from sepp_ray.methods import create_method, method_hparams
from sepp_ray.methods.base import Method
from sepp_ray.train import (
    LossModule,
    NonFiniteLossError,
    StepConfig,
    Trainer,
    build_optimizer,
    prepare_loss_module,
    rng_state,
    seed_everything,
    set_rng_state,
    train_epoch,
)

SIZE, N = 16, 8
SMALL = {"proj_hidden_dim": 64, "proj_output_dim": 32}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread per test, restored after (tiny tensors on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(name: str = "simclr", seed: int = 0, **hp: Any) -> Method:
    torch.manual_seed(seed)
    small = {k: v for k, v in SMALL.items() if k in {f.name for f in fields(method_hparams(name))}}
    return create_method(name, backbone="test_resnet", cifar_stem=True, **(small | hp))


def images(n: int, seed: int) -> Tensor:
    """n smooth random uint8 images, n x SIZE x SIZE x 3 (Ray Data's layout)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=SIZE, mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def batch(n: int = N, seed: int = 0, pair: bool = False) -> dict[str, Tensor]:
    img = images(n, seed)
    pos = torch.full((n, 2), -1, dtype=torch.long)
    pos[0, 0], pos[1, 0] = 1, 0  # items 0 and 1 are semantic positives of each other
    return {
        "image": img,
        "image2": images(n, seed + 100) if pair else img.clone(),
        "id": torch.arange(n, dtype=torch.long),
        "pos_ids": pos,
        # image ids behind the views: a pair item's view 2 is another image
        "view_ids": torch.stack([torch.arange(n), torch.arange(n) + (1000 if pair else 0)], 1),
        "group": torch.full((n,), -1, dtype=torch.long),
    }


def make_trainer(
    method: Method,
    drop: tuple[str, ...] = (),
    opt: str = "lars",
    lr: float = 2.0,
    steps: int = 20,
    aug_seed: int = 0,
    **cfg: Any,
) -> Trainer:
    loss_module = prepare_loss_module(method, "cpu")
    augment = GPUAugment(get_recipe(method.default_recipe, SIZE, drop=drop), seed=aug_seed)
    optimizer = build_optimizer(opt, method, lr=lr, weight_decay=1e-6)
    return Trainer(loss_module, method, augment, optimizer, StepConfig(**cfg), steps, 2, base_lr=lr)


def params(method: Method) -> list[Tensor]:
    return [p.detach().clone() for p in method.parameters()]


def assert_same(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_loss_falls_simclr() -> None:
    trainer = make_trainer(tiny(), drop=("jitter", "grayscale"))
    losses: list[float] = []
    read = trainer.read_metrics

    def recorded() -> dict[str, float]:  # each interval's mean loss, as the epoch reads it
        metrics = read()
        losses.append(metrics["loss"])
        return metrics

    trainer.read_metrics = recorded  # type: ignore[method-assign]
    out = train_epoch(trainer, [batch()] * 20, 0, 0, log_every=1)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, losses
    assert out["steps"] == 20 and out["last_step"] == 19 and out["next_step"] == 20
    assert out["loss"] == pytest.approx(sum(losses) / 20)
    assert out["pairs_per_s"] > 0 and out["lr"] < 0.1  # the cosine ends near final_lr = 0


def test_nan_loss_raises_at_the_next_read() -> None:
    method = tiny()
    trainer = make_trainer(method)
    poison = {"on": False}

    def hook(_m: Any, _i: Any, out: Tensor) -> Tensor:
        return out * float("nan") if poison["on"] else out

    method.projector.register_forward_hook(hook)
    for s in range(2):
        trainer.train_step(batch(), 0, s)
    good = trainer.read_metrics()
    assert good["steps"] == 2 and np.isfinite(good["loss"])
    trainer.train_step(batch(), 0, 2)
    poison["on"] = True
    for s in (3, 4):  # no raise inside the interval: the check is on the device (step 5 too:
        # the NaN weights of step 3 make every later loss NaN)
        trainer.train_step(batch(), 0, s)
    poison["on"] = False
    trainer.train_step(batch(), 0, 5)
    with pytest.raises(NonFiniteLossError, match=f"step 3 .*3 step.*last finite .* {good['loss']}"):
        trainer.read_metrics()
    # train_epoch raises from its read, whatever the interval
    trainer = make_trainer(tiny())
    trainer.loss_module.method.projector.register_forward_hook(hook)
    poison["on"] = True
    with pytest.raises(NonFiniteLossError, match=r"step 6 \(2 step"):
        train_epoch(trainer, [batch()] * 3, 0, 6, log_every=2)


def test_read_metrics_means_and_batch_size() -> None:
    trainer = make_trainer(tiny("byol"), opt="sgd", lr=0.05)
    losses = [float(trainer.train_step(batch(), 0, s)["loss"]) for s in range(3)]
    out = trainer.read_metrics()
    assert out["loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert out["steps"] == 3 and 0 < out["momentum"] < 1 and out["lr"] > 0
    with pytest.raises(SeppError, match="no training step"):
        trainer.read_metrics()
    with pytest.raises(SeppError, match="batch size changed from 8 to 6 at step 3"):
        trainer.train_step(batch(n=6), 0, 3)
    with pytest.raises(SeppError, match="log_every"):
        train_epoch(trainer, [batch()], 0, 0, log_every=-1)


def step_loss(pair_use: str, pos_ids: Tensor | None = None) -> float:
    trainer = make_trainer(tiny(), pair_use=pair_use)
    b = batch()
    if pos_ids is not None:
        b["pos_ids"] = pos_ids
    return float(trainer.train_step(b, 0, 5)["loss"])


def test_pair_use_passes_pos_ids() -> None:
    plain = step_loss("none")
    attract, cancel = step_loss("attract"), step_loss("cancel")  # items 0 and 1 linked
    assert attract != pytest.approx(plain, rel=1e-4)
    assert cancel != pytest.approx(plain, rel=1e-4)
    assert cancel != pytest.approx(attract, rel=1e-4)
    # nothing linked: the same loss as without pos_ids, so the difference came from them
    for use in ("attract", "cancel"):
        assert step_loss(use, torch.full((N, 2), -1)) == pytest.approx(plain, rel=1e-6)
    trainer = make_trainer(tiny(), pair_use="attract")
    with pytest.raises(SeppError, match="pos_ids"):
        trainer.train_step({k: v for k, v in batch().items() if k != "pos_ids"}, 0, 0)


@pytest.mark.parametrize(
    "name,use", [("byol", "attract"), ("vicreg", "cancel"), ("supcon", "cancel")]
)
def test_trainer_refuses_a_pair_use_the_method_cannot_honour(name: str, use: str) -> None:
    with pytest.raises(SeppError, match=f"{name}.*cannot use.*simclr"):
        make_trainer(tiny(name), opt="sgd", pair_use=use)
    with pytest.raises(SeppError, match="pair_use"):
        StepConfig(pair_use="multi_positive")


def test_labels_reach_supcon() -> None:
    def loss(labels: Tensor | None) -> float:
        b = batch()
        if labels is not None:
            b["label"] = labels
        return float(make_trainer(tiny("supcon")).train_step(b, 0, 5)["loss"])

    a = loss(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert a != pytest.approx(loss(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])), rel=1e-4)
    for bad in (None, torch.full((N,), -1)):
        with pytest.raises(SeppError, match="supcon"):
            loss(bad)


def processed(img: Tensor, size: int) -> Tensor:
    """What a pipeline without random ops makes: resize (bilinear), ImageNet normalisation."""
    x = img.permute(0, 3, 1, 2).float() / 255  # B x 3 x H x W
    if size != x.shape[-1]:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def captured_views(trainer: Trainer, b: dict[str, Tensor]) -> list[Tensor]:
    seen: list[list[Tensor]] = []
    handle = trainer.loss_module.register_forward_pre_hook(
        lambda _m, args: seen.append([v.clone() for v in args[0]])
    )
    trainer.train_step(b, 0, 3)
    handle.remove()
    return seen[0]


def test_pair_items_view2_from_image2() -> None:
    b = batch(pair=True)
    views = captured_views(make_trainer(tiny(), drop=tuple(OPS)), b)
    assert len(views) == 2
    torch.testing.assert_close(views[0], processed(b["image"], SIZE))
    torch.testing.assert_close(views[1], processed(b["image2"], SIZE))


def test_multicrop_local_views_from_image() -> None:
    dino = tiny("dino", out_dim=64, bottleneck_dim=32)
    b = batch(n=4, pair=True)
    views = captured_views(make_trainer(dino, drop=tuple(OPS), opt="sgd", lr=0.01), b)
    recipe = get_recipe("dino", SIZE)
    assert len(views) == 2 + recipe.n_local
    assert recipe.local is not None
    torch.testing.assert_close(views[1], processed(b["image2"], SIZE))
    for v in views[2:]:
        assert v.shape[-1] == recipe.local.crop_size
        torch.testing.assert_close(v, processed(b["image"], recipe.local.crop_size))


def test_bf16_autocast_on_cpu() -> None:
    fp32 = float(make_trainer(tiny(), amp="off").train_step(batch(), 0, 5)["loss"])
    bf16 = float(make_trainer(tiny(), amp="bf16").train_step(batch(), 0, 5)["loss"])
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)


def test_config_and_model_checks() -> None:
    with pytest.raises(SeppError, match="amp"):
        StepConfig(amp="fp16")
    method = tiny()
    other = LossModule(tiny())
    aug = GPUAugment(get_recipe("simclr", SIZE))
    opt = build_optimizer("sgd", method, lr=0.1, weight_decay=0.0)
    with pytest.raises(SeppError, match="LossModule"):
        Trainer(other, method, aug, opt, StepConfig(), 10, 0, 0.1)
    trainer = make_trainer(method)
    with pytest.raises(SeppError, match="no batches"):
        train_epoch(trainer, [], 0, 0)
    with pytest.raises(SeppError, match="image2"):
        trainer.train_step({"image": batch()["image"], "id": torch.arange(N)}, 0, 0)


def run_from(trainer: Trainer, start: int, n: int) -> None:
    for s in range(start, start + n):
        trainer.train_step(batch(seed=s), 0, s)


def test_resume_is_exact(tmp_path: Path) -> None:
    seed_everything(7, rank=0)
    method = tiny()
    trainer = make_trainer(method, aug_seed=1)
    run_from(trainer, 0, 3)
    ckpt = {
        "model": method.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "rng": rng_state(trainer.augment, trainer.device),
    }
    torch.save(ckpt, tmp_path / "state.pt")
    run_from(trainer, 3, 2)
    draws = (random.random(), np.random.rand(), torch.rand(1))
    continued = params(method)

    ckpt = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = tiny(seed=99)
    again = make_trainer(resumed, aug_seed=12345)  # a different stream until restored
    resumed.load_state_dict(ckpt["model"])
    again.optimizer.load_state_dict(ckpt["optimizer"])
    not_restored = params(resumed)
    set_rng_state(ckpt["rng"], again.augment, again.device)
    run_from(again, 3, 2)
    assert_same(params(resumed), continued)
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(1), draws[2])

    # the check can fail: without the augment's generator state the views differ
    other = tiny(seed=99)
    third = make_trainer(other, aug_seed=12345)
    other.load_state_dict(ckpt["model"])
    third.optimizer.load_state_dict(ckpt["optimizer"])
    assert_same(params(other), not_restored)
    set_rng_state(ckpt["rng"])  # everything but the augment
    run_from(third, 3, 2)
    assert not all(torch.equal(a, b) for a, b in zip(params(other), continued, strict=True))
    assert "augment" in rng_state(third.augment, "cpu")


def test_seed_everything_per_rank() -> None:
    assert len({seed_everything(0, 0), seed_everything(0, 1), seed_everything(1, 0)}) == 3
    s = seed_everything(3, 1)
    a = torch.rand(2)
    assert seed_everything(3, 1) == s and torch.equal(torch.rand(2), a)


# --- two gloo ranks on half the batch each == one process on the whole batch ----------------

DDP_STEPS = 2


def ddp_batch(rank: int, world: int) -> dict[str, Tensor]:
    b = batch(pair=True)
    b["pos_ids"][2, 0], b["pos_ids"][6, 0] = 6, 2  # linked across the two ranks' halves
    part = slice(rank * N // world, (rank + 1) * N // world)
    return {k: v[part] for k, v in b.items()}


def ddp_run(rank: int, world: int) -> tuple[list[float], list[Tensor]]:
    """DDP_STEPS LARS steps of SimCLR (BN in eval mode: batch statistics differ per rank)."""
    method = tiny().eval()
    loss_module = prepare_loss_module(method, "cpu")
    model = DistributedDataParallel(loss_module) if world > 1 else loss_module
    augment = GPUAugment(get_recipe("simclr", SIZE, drop=tuple(OPS)), seed=0)
    optimizer = build_optimizer("lars", method, lr=1.0, weight_decay=1e-4)
    cfg = StepConfig(pair_use="attract")
    trainer = Trainer(model, method, augment, optimizer, cfg, 10, 1, base_lr=1.0)
    b = ddp_batch(rank, world)
    losses = []
    for s in range(1, 1 + DDP_STEPS):
        trainer.train_step(b, 0, s)
        losses.append(trainer.read_metrics()["loss"])  # the mean over ranks
    return losses, params(method)


def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = ddp_run(rank, world)
        if rank == 0:
            torch.save(result, out)
    finally:
        torch_dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.pt"
    mp.spawn(ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    losses, got = torch.load(out)
    want_losses, want = ddp_run(0, 1)
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(want, params(tiny()), strict=True))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_worker_config_refuses_a_run_no_rank_could_train() -> None:
    """The driver's resolved run is checked when built, before any Ray Train worker starts."""
    from types import SimpleNamespace

    from sepp_ray.train.config import WorkerConfig
    from sepp_ray.train.optim_defaults import method_recipe

    def run(**kw: Any) -> WorkerConfig:
        base: dict[str, Any] = dict(
            method="simclr",
            backbone="test_resnet",
            cifar_stem=True,
            hparams={},
            image_size=16,
            recipe=get_recipe("simclr", 16),
            seed=0,
            sync_bn=False,
            channels_last=False,
            compile=False,
            amp="auto",
            pair_use="none",
            optim=method_recipe("simclr"),
            lr=0.1,
            warmup_steps=2,
            data=SimpleNamespace(total_steps=10, global_batch=8),
            workers=2,
            preflight=True,
            preflight_limit_gb=None,
            dataset="d",
            split="train",
            out="o",
            checkpoint_every=1,
            keep_checkpoints=2,
            monitor=None,
            knn_every=1,
            knn_k=20,
            num_classes=10,
        )
        return WorkerConfig(**{**base, **kw})

    assert run().warmup_steps == 2
    for kw, message in [
        ({"amp": "fp8"}, "amp must be one of"),
        ({"pair_use": "both"}, "pair_use must be one of"),
        ({"warmup_steps": 10}, r"warmup_steps 10 must be in \[0, 10\)"),
        ({"lr": 0.0}, "learning rate must be > 0"),
        ({"workers": 3}, "batch_size 8 must divide evenly over 3 workers"),
        ({"image_size": 0}, "image_size must be >= 1"),
    ]:
        with pytest.raises(SeppError, match=message):
            run(**kw)
