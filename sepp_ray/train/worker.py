"""The per-worker training loop that Ray Train runs on every rank.

Every rank builds the same method, resumes from the checkpoint Ray Train hands it
(``ray.train.get_checkpoint``: after a lost worker, or in a run restored after its driver
died), trains its shard of the items and calls ``ray.train.report`` once per epoch, or every
``report_every_steps`` optimizer steps (runs of different epoch lengths then report at the same
steps), so all ranks report the same number of times. Only rank 0 writes files: checkpoints
(written into Ray Train's run folder and reported there, `sepp_ray.train.ray_checkpoints`),
TensorBoard logs. The models and losses know nothing of this module. `train_loop` tells the
run in steps: build, check the batch fits, resume, then train, save and report each epoch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from sepp_ray.train.rank_data import epoch_batches, round_stream, rounds_of
from sepp_ray.train.reports import (
    Board,
    Reports,
    knn_monitor,
    load_monitor,
    pair_totals,
    saves_after,
)

if TYPE_CHECKING:
    from sepp_ray.methods.base import Method
    from sepp_ray.models.checkpoint import BackboneMeta
    from sepp_ray.train.config import WorkerConfig
    from sepp_ray.train.step import Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Rank:
    """This worker's place in the run."""

    rank: int
    world: int
    device: torch.device

    @staticmethod
    def current() -> _Rank:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return _Rank(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())


@dataclass
class _Model:
    """What a rank trains and checkpoints: the method, its optimizer, the augmentation (whose
    RNG state a checkpoint keeps), the step that drives them, and the backbone's meta."""

    method: Method
    optimizer: torch.optim.Optimizer
    augment: Any
    trainer: Trainer
    meta: BackboneMeta


@dataclass
class _Progress:
    """Where this (re)start of the loop begins, and the run's record that each checkpoint
    saves: the history, the epoch of every (re)start, the node of every rank."""

    start: int
    history: list[dict[str, Any]]
    starts: list[int]
    nodes: list[Any]


def train_loop(cfg: WorkerConfig) -> None:
    """Ray Train's ``train_loop_per_worker``; ``cfg`` is the run the driver resolved."""
    from sepp_ray.train.rng import seed_everything

    where = _Rank.current()
    seed = seed_everything(cfg.seed, where.rank)
    model = _build(cfg, where, seed)
    if _batch_too_big(cfg, where, model):
        return  # the local batch does not fit the device: rank 0 left the error for the driver
    progress = _resume(cfg, where, model)
    reports = _reports(cfg, where, model, progress.history)
    _train_epochs(cfg, where, model, progress, reports)


def _method(cfg: WorkerConfig, where: _Rank, seed: int) -> Method:
    """The method, with the same initial weights on every rank (then each rank's own seed)."""
    from sepp_ray.methods import create_method

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    method = create_method(
        cfg.method, backbone=cfg.backbone, cifar_stem=cfg.cifar_stem, **cfg.hparams
    )
    torch.manual_seed(seed)
    if cfg.sync_bn and where.world > 1:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    return method


def _wrapped(
    cfg: WorkerConfig, where: _Rank, method: Method, channels_last: bool
) -> torch.nn.Module:
    """The method's loss module on the device, in DDP over the ranks, compiled when asked."""
    from torch.nn.parallel import DistributedDataParallel

    from sepp_ray.train.step import prepare_loss_module

    cuda = where.device.type == "cuda"
    if cuda:  # fixed input shapes: let cuDNN time its convolution algorithms once and keep the best
        torch.backends.cudnn.benchmark = True
    loss_module = prepare_loss_module(method, where.device, channels_last=channels_last)
    model: torch.nn.Module = loss_module
    if where.world > 1:
        model = DistributedDataParallel(
            loss_module, device_ids=[where.device.index] if cuda else None, broadcast_buffers=False
        )
    if cfg.compile:
        # compiled around DDP, as the DDP notes ask ("apply the DDP model wrapper before
        # compiling the model"): TorchDynamo's DDPOptimizer then splits the graph at DDP's
        # bucket boundaries, so gradient all-reduce still overlaps the backward. The step has
        # no host sync after its first (sepp_ray.train.step), so no graph breaks on one.
        model = torch.compile(model)  # type: ignore[assignment]
    return model


def _build(cfg: WorkerConfig, where: _Rank, seed: int) -> _Model:
    """The method, its wrapped loss module, the GPU augmentation, the optimizer and the step."""
    from sepp_ray.data.augment import GPUAugment
    from sepp_ray.train.resident import ResidentPlan
    from sepp_ray.train.step import StepConfig, Trainer

    method = _method(cfg, where, seed)
    channels_last = cfg.channels_last and where.device.type == "cuda"
    model = _wrapped(cfg, where, method, channels_last)
    data, recipe, optim = cfg.data, cfg.recipe, cfg.optim
    # crop decoding (CPU), or JPEG bytes cropped on the device: each view's crop was taken
    # from the stored image before the GPU recipe
    cpu_cropped = not isinstance(data, ResidentPlan) and data.spec.view1 is not None
    gpu_recipe = recipe.with_drop(("crop",)) if cpu_cropped else recipe
    augment = GPUAugment(gpu_recipe, seed=seed, channels_last=channels_last)
    optimizer = optim.build(method, cfg.lr)
    trainer = Trainer(
        model,
        method,
        augment,
        optimizer,
        StepConfig(
            amp=cfg.amp,
            channels_last=channels_last,
            grad_clip=optim.grad_clip,
            pair_use=cfg.pair_use,
        ),
        total_steps=data.total_steps,
        warmup_steps=cfg.warmup_steps,
        base_lr=cfg.lr,
        final_lr=optim.end_lr(cfg.lr),
    )
    return _Model(method, optimizer, augment, trainer, _backbone_meta(cfg, method))


def _backbone_meta(cfg: WorkerConfig, method: Method) -> BackboneMeta:
    """How readers rebuild and feed the backbone (saved in every checkpoint)."""
    from sepp_ray.models.checkpoint import BackboneMeta

    return BackboneMeta(
        cfg.backbone,
        cfg.cifar_stem,
        method.feat_dim,
        cfg.image_size,
        tuple(cfg.recipe.view1.mean),  # type: ignore[arg-type]
        tuple(cfg.recipe.view1.std),  # type: ignore[arg-type]
    )


def _batch_too_big(cfg: WorkerConfig, where: _Rank, model: _Model) -> bool:
    """The preflight: whether the local batch does not fit the device (rank 0 then leaves
    the error where the driver looks)."""
    from sepp_ray.train.preflight import run_preflight

    return run_preflight(
        model.trainer,
        where.rank,
        out=cfg.out,
        local_batch=cfg.data.local_batch(where.world),
        image_size=cfg.image_size,
        workers=cfg.workers,
        backbone=cfg.backbone,
        limit_gb=cfg.preflight_limit_gb,
        enabled=cfg.preflight,
    )


def _resume(cfg: WorkerConfig, where: _Rank, model: _Model) -> _Progress:
    """Resume from the checkpoint Ray hands this worker group (`resume_uri`: its newest
    reported one, after a lost worker or in a run restored after its driver died), or start
    at epoch 0; and record this start and the node of every rank."""
    from sepp_ray.train.ray_checkpoints import resume_uri
    from sepp_ray.train.rng import set_rng_state
    from sepp_ray.train.state import load_training_state

    start, history, starts = 0, [], []
    uri = resume_uri(cfg.out)
    if uri is not None:
        state, _ = load_training_state(uri)
        model.method.load_state_dict(state["method"])
        model.optimizer.load_state_dict(state["optimizer"])
        rngs = state["rng"]
        rng = rngs[where.rank] if where.rank < len(rngs) else rngs[0]
        set_rng_state(rng, model.augment, where.device)
        start, history = int(state["epoch"]), list(state["history"])
        starts = list(state.get("starts", []))
        if where.rank == 0:
            print(f"[sepp] resuming from {uri} (epoch {start})", flush=True)
    starts.append(start)  # one entry per (re)start of this loop: recovery is visible
    return _Progress(start, history, starts, _node_ids(where.world))


def _node_ids(world: int) -> list[Any]:
    """The node each rank runs on (recorded in the run's manifest)."""
    import ray
    import torch.distributed as tdist

    from sepp_ray import dist

    node = ray.get_runtime_context().get_node_id()
    if not dist.is_dist():
        return [node]
    nodes: list[Any] = [None] * world
    tdist.all_gather_object(nodes, node)
    return nodes


def _norm(model: _Model, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's input normalisation (mean, std as 1 x 3 x 1 x 1) on ``device``: what the
    kNN monitor and a re-mining round feed un-augmented images with."""
    meta = model.meta
    mean = torch.tensor(meta.mean, device=device).view(1, 3, 1, 1)
    return mean, torch.tensor(meta.std, device=device).view(1, 3, 1, 1)


def _reports(
    cfg: WorkerConfig, where: _Rank, model: _Model, history: list[dict[str, Any]]
) -> Reports:
    """The reports of the run: TensorBoard and the kNN monitor live on rank 0."""
    device = where.device
    mean, std = _norm(model, device)
    monitor = load_monitor(cfg.monitor) if cfg.monitor is not None and where.rank == 0 else None
    board = Board(cfg.out) if where.rank == 0 else None
    knn = None
    if monitor is not None:
        knn = partial(
            knn_monitor, model.method, monitor, cfg.num_classes, cfg.knn_k, device, mean, std
        )
    return Reports(cfg, where.rank, where.world, history, board, knn)


def _train_epochs(
    cfg: WorkerConfig, where: _Rank, model: _Model, progress: _Progress, reports: Reports
) -> None:
    """The epochs from the resume point: train one, save its checkpoint when due, report."""
    from sepp_ray.train.dataplane import DataPlan
    from sepp_ray.train.progress import write_progress
    from sepp_ray.train.resident import ResidentFeed, ResidentPlan

    data = cfg.data
    resident = ResidentFeed(data, where.device) if isinstance(data, ResidentPlan) else None
    norm = _norm(model, where.device)
    rounds, streamed = rounds_of(cfg, where.device, model.method, norm, resident)
    stream = None
    if resident is None and streamed is None:
        assert isinstance(data, DataPlan)
        stream = data.stream(where.world, where.rank, progress.start)
    model.method.train()
    epochs = data.epochs  # the plan's: a step budget may stop the last one part way
    for epoch in range(progress.start, epochs):
        if rounds is not None and not rounds.before_epoch(epoch):
            return  # the round could not be mined: rank 0 left the reason for the driver
        reports.round = rounds.current if rounds is not None else None
        if streamed is not None and rounds is not None:
            data, stream = round_stream(streamed, rounds, epoch, where.world, where.rank)
        t0 = time.perf_counter()
        batches = epoch_batches(
            data, resident, epoch, where.world, where.rank, where.device, stream
        )
        metrics = _train_epoch(cfg, where, model, reports, epoch, batches, t0)
        if metrics is None:
            return  # the loss became non-finite: rank 0 left the reason for the driver
        saved = _save_if_due(cfg, where, model, progress, epoch + 1, metrics)
        if where.rank == 0:
            write_progress(cfg.out, epoch + 1, epochs, metrics)
        reports.end_epoch(metrics, epoch, saved)


def _train_epoch(
    cfg: WorkerConfig,
    where: _Rank,
    model: _Model,
    reports: Reports,
    epoch: int,
    batches: Any,
    t0: float,
) -> dict[str, Any] | None:
    """Train ``epoch`` (in segments that end at the run's fixed-step reports) and return its
    metrics; None when the loss became non-finite. Every rank stops there together (the check
    is collective) and rank 0 leaves the reason where the driver looks: a raise would make Ray
    Train retry the same divergence."""
    from sepp_ray.storage import Location
    from sepp_ray.train.milestones import train_to_milestones
    from sepp_ray.train.state import DIVERGED
    from sepp_ray.train.step import NonFiniteLossError

    data = cfg.data
    steps = data.steps_in(epoch)
    reports.begin_epoch(epoch)
    try:
        stats = train_to_milestones(
            model.trainer,
            batches,
            epoch,
            epoch * data.steps_per_epoch,
            steps,
            every=cfg.report_every_steps,
            total=data.total_steps,
            reference_steps=cfg.reference_steps_per_epoch,
            on_report=reports.milestone,
        )
    except NonFiniteLossError as e:
        if where.rank == 0:
            Location(cfg.out).write_bytes(DIVERGED, json.dumps({"error": str(e)}).encode())
        return None
    if int(stats["steps"]) != steps:
        raise RuntimeError(f"rank {where.rank} got {stats['steps']} of {steps} steps")
    metrics: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": int(stats["next_step"]),
        "loss": stats["loss"],
        "lr": stats["lr"],
        "pairs_per_s": stats["pairs_per_s"] * where.world,
        "epoch_seconds": time.perf_counter() - t0,
        **pair_totals(stats, where.world),
    }
    reports.settle_epoch(metrics, epoch)
    return metrics


def _save_if_due(
    cfg: WorkerConfig,
    where: _Rank,
    model: _Model,
    progress: _Progress,
    done: int,
    metrics: dict[str, Any],
) -> int | None:
    """Epoch ``done``'s checkpoint when due (`saves_after`): every rank's RNG state gathered,
    rank 0 writes it into Ray Train's run folder (Ray prunes it there, by the run's
    ``CheckpointConfig``); returns ``done`` when saved."""
    import torch.distributed as tdist

    from sepp_ray import dist
    from sepp_ray.train.rng import rng_state
    from sepp_ray.train.state import save_training_checkpoint

    if not saves_after(cfg, done):
        return None
    rngs = [rng_state(model.augment, where.device)]
    if dist.is_dist():
        gathered: list[Any] = [None] * where.world
        tdist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if where.rank == 0:
        state = {
            "method": model.method.state_dict(),
            "optimizer": model.optimizer.state_dict(),
            "rng": rngs,
            "epoch": done,
            "history": progress.history,
            "starts": progress.starts,
            "nodes": progress.nodes,
        }
        info = {
            "method": cfg.method,
            "optimizer": cfg.optim.optimizer,
            "metrics": (progress.history or [metrics])[-1],
            "dataset": {"uri": cfg.dataset, "split": cfg.split},
        }
        save_training_checkpoint(
            cfg.out, done, model.method.backbone, model.meta, state, info, keep=0
        )
    if dist.is_dist():
        tdist.barrier()
    return done
