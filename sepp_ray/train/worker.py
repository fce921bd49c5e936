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
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from sepp_ray.methods.base import Method
    from sepp_ray.models.checkpoint import BackboneMeta
    from sepp_ray.train.config import WorkerConfig
    from sepp_ray.train.dataplane import DataPlan
    from sepp_ray.train.feed import RankFeed
    from sepp_ray.train.resident import ResidentFeed, ResidentPlan
    from sepp_ray.train.step import Trainer

log = logging.getLogger(__name__)


def _features(
    method: torch.nn.Module,
    images: np.ndarray,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    batch: int = 512,
) -> torch.Tensor:
    """Backbone features of un-augmented uint8 images (N x S x S x 3), eval mode."""
    from sepp_ray.models.encode import encode

    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # N x 3 x S x S, a view
    return encode(method, pixels, mean, std, device, batch_size=batch)


def load_monitor(refs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The monitor's decoded samples (ObjectRefs of `read_slice` outputs) as arrays."""
    import ray

    out: dict[str, np.ndarray] = {}
    for name in ("train", "query"):
        parts = ray.get(refs[name])
        out[f"{name}_images"] = np.concatenate([p["image"] for p in parts])
        out[f"{name}_labels"] = np.concatenate([p["label"] for p in parts])
        out[f"{name}_ids"] = np.concatenate([p["id"] for p in parts])
    return out


def knn_monitor(
    method: torch.nn.Module,
    monitor: dict[str, np.ndarray],
    num_classes: int,
    k: int,
    device: torch.device,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> dict[str, float]:
    from sepp_ray.models.knn import knn_classify

    tr = _features(method, monitor["train_images"], mean, std, device)
    te = _features(method, monitor["query_images"], mean, std, device)
    return knn_classify(
        tr,
        torch.from_numpy(monitor["train_labels"]).to(device),
        te,
        torch.from_numpy(monitor["query_labels"]).to(device),
        num_classes,
        k=min(k, len(tr)),
    )


class _Board:
    """TensorBoard on rank 0: written locally, copied to object storage after each epoch."""

    def __init__(self, out_uri: str) -> None:
        from tensorboardX import SummaryWriter

        from sepp_ray.storage import filesystem, is_remote

        self.remote = is_remote(out_uri)
        self.fs, base = filesystem(out_uri)
        self.target = f"{base}/tensorboard"
        self.dir = tempfile.mkdtemp(prefix="sepp-tb-") if self.remote else self.target
        self.writer = SummaryWriter(self.dir)

    def log(self, metrics: dict[str, float], epoch: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()
        if self.remote:
            self.fs.put(self.dir + "/", self.target + "/", recursive=True)


def pair_totals(stats: dict[str, float], world: int) -> dict[str, int]:
    """Totals over all ranks of a stretch of steps: pair items trained on (semantic, curated,
    augmentation), mined pairs that took part in the loss (multi-positive, cancel), and
    same-image (query, key) pairs left among the negatives (0 proves the image mask).
    `train_epoch` gives per-step, per-rank means."""
    n = stats["steps"] * world
    keys = ("pair_items", "pairs_used", "same_image_negatives")
    return {k: int(round(stats.get(k, 0.0) * n)) for k in keys}


class _Reports:
    """What a report does: the kNN monitor when due (rank 0 holds the monitor), the history
    entry, TensorBoard and the console line (rank 0), and ``ray.train.report`` on every rank,
    the same number of times. Without ``report_every_steps`` each epoch's end reports, with the
    epoch's checkpoint when one was saved. With it, a run reports at fixed optimizer steps
    (`sepp_ray.train.milestones.train_to_milestones` calls `milestone`): the report at an
    epoch's end waits for the epoch's checkpoint and carries it, and a checkpoint saved between
    reports gets a report of its own, marked `CHECKPOINT_ONLY`. A report with a checkpoint
    carries the kNN monitor's result, by which Ray keeps the best checkpoints."""

    def __init__(
        self,
        cfg: WorkerConfig,
        rank: int,
        world: int,
        history: list[dict[str, Any]],
        board: _Board | None,
        knn: Callable[[], dict[str, float]] | None,
    ) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.history, self.board, self.knn = history, board, knn
        self.by_epoch = cfg.report_every_steps is None
        self.epoch_end = -1  # the global step at which the epoch being trained ends
        self.saves = False  # whether that epoch ends with a checkpoint
        self.held: tuple[dict[str, Any], int] | None = None  # its end's report, held for it

    def begin_epoch(self, epoch: int) -> None:
        data = self.cfg.data
        self.epoch_end = epoch * data.steps_per_epoch + data.steps_in(epoch)
        self.saves = saves_after(self.cfg, epoch + 1)

    def add_knn(self, metrics: dict[str, Any], due: bool) -> None:
        if due and self.knn is not None:
            knn = self.knn()
            metrics["knn_top1"], metrics["knn_top5"] = knn["top1"], knn["top5"]

    def record(self, metrics: dict[str, Any]) -> None:
        """The history entry (saved with the next checkpoint; the manifest's history)."""
        self.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def publish(self, metrics: dict[str, Any], x: int, where: str, saved: int | None) -> None:
        """TensorBoard at ``x`` and the console (rank 0), then every rank reports, with the
        checkpoint of epoch ``saved`` when one was just written."""
        from sepp_ray.train.ray_checkpoints import report

        if self.board is not None:
            self.board.log(metrics, x)
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch")
            print(f"[sepp] {where} {shown}", flush=True)
        report(metrics, self.cfg.out, saved, self.rank)

    def milestone(self, stats: dict[str, float], step: int) -> None:
        """A report at global step ``step`` (a multiple of report_every_steps, or the last):
        the kNN monitor every ``knn_every`` reports, at the end and with a checkpoint."""
        cfg, total = self.cfg, self.cfg.data.total_steps
        every = cfg.report_every_steps or 1
        metrics: dict[str, Any] = {
            "step": step,
            "epoch": round(step / cfg.data.steps_per_epoch, 4),  # data epochs done
            "loss": stats["loss"],
            "lr": stats["lr"],
            "pairs_per_s": stats["pairs_per_s"] * self.world,
            **pair_totals(stats, self.world),
        }
        at_end = step == self.epoch_end
        due = (step // every) % cfg.knn_every == 0 or step == total
        self.add_knn(metrics, due or (at_end and self.saves))
        self.record(metrics)
        if at_end:
            self.held = (metrics, step)
        else:
            self.publish(metrics, step, f"step {step}/{total}", None)

    def settle_epoch(self, metrics: dict[str, Any], epoch: int) -> None:
        """Reporting by epoch: the kNN monitor when due or at a checkpoint, and the history
        entry, before the checkpoint (which saves the history) is written."""
        if self.by_epoch:
            done, epochs = epoch + 1, self.cfg.data.epochs
            due = done % self.cfg.knn_every == 0 or done == epochs
            self.add_knn(metrics, due or self.saves)
            self.record(metrics)

    def end_epoch(self, metrics: dict[str, Any], epoch: int, saved: int | None) -> None:
        """The epoch's report, after its checkpoint (epoch ``saved``, or None) was written."""
        from sepp_ray.train.ray_checkpoints import CHECKPOINT_ONLY, report

        if self.by_epoch:
            where = f"epoch {epoch + 1}/{self.cfg.data.epochs}"
            self.publish(metrics, epoch + 1, where, saved)
        elif self.held is not None:
            (held, step), self.held = self.held, None
            self.publish(held, step, f"step {step}/{self.cfg.data.total_steps}", saved)
        elif saved is not None:
            only = {**metrics, CHECKPOINT_ONLY: True}
            self.add_knn(only, True)
            report(only, self.cfg.out, saved, self.rank)


def saves_after(cfg: WorkerConfig, done: int) -> bool:
    """Whether a checkpoint follows epoch ``done`` (counted from 1): every
    ``checkpoint_every`` epochs, and the last."""
    return done % cfg.checkpoint_every == 0 or done == cfg.data.epochs


def _pinned(batches: Any) -> Any:
    """numpy batches -> tensors in pinned (page-locked) host memory, so the copy to the GPU can
    run asynchronously (`non_blocking=True`); JPEG-byte batches pass through."""
    for b in batches:
        if "image_bytes" in b:
            yield b
        else:
            yield {k: torch.from_numpy(v).pin_memory() for k, v in b.items()}


def _on_device(
    batches: Any,
    device: torch.device,
    pin_ahead: int = 2,
    spec: Any = None,
    crop_seed: tuple[int, ...] = (0,),
) -> Any:
    """numpy batches -> tensors on `device`. On CUDA the pinning copy runs `pin_ahead` batches
    ahead in a thread (a host memcpy of the whole batch, tens of ms at 224 px, kept off the
    step's thread) and the host-to-device copy is asynchronous. Batches of JPEG bytes
    (``decode_on=gpu``) are decoded on the device, and cropped there when ``spec`` carries view
    crops (boxes from a generator seeded by ``crop_seed``)."""
    from sepp_ray.train.device_decode import crop_generator
    from sepp_ray.train.feed import decode_on_device, prefetched

    gen = None
    if device.type == "cuda":
        batches = prefetched(_pinned(batches), pin_ahead)
    for b in batches:
        if "image_bytes" in b:
            gen = gen or crop_generator(device, *crop_seed)
            out = decode_on_device(b, device, spec, gen)
            if out.cpu_decoded:
                log.info(
                    "%d JPEG(s) of a batch decoded on the CPU (refused by the device's decoder)",
                    out.cpu_decoded,
                )
            yield out
            continue
        if device.type == "cuda":
            yield {k: v.to(device, non_blocking=True) for k, v in b.items()}
        else:
            yield {k: torch.from_numpy(v) for k, v in b.items()}


def _epoch_batches(
    data: DataPlan | ResidentPlan,
    resident: ResidentFeed | None,
    epoch: int,
    world: int,
    rank: int,
    device: torch.device,
    stream: RankFeed | None = None,
) -> Any:
    """This rank's batches of ``epoch`` on ``device``: gathered from the split held in memory
    (resident), or streamed through the decode tasks (``stream``: one read pipeline across
    epochs) and copied over."""
    from sepp_ray.train.dataplane import DataPlan

    if resident is not None:
        return resident.batches(epoch, world, rank)
    assert isinstance(data, DataPlan)
    seed = (data.seed, epoch, rank)
    batches = stream.epoch(epoch) if stream is not None else data.batches(epoch, world, rank)
    return _on_device(batches, device, spec=data.spec, crop_seed=seed)


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


def _reports(
    cfg: WorkerConfig, where: _Rank, model: _Model, history: list[dict[str, Any]]
) -> _Reports:
    """The reports of the run: TensorBoard and the kNN monitor live on rank 0."""
    device, meta = where.device, model.meta
    mean = torch.tensor(meta.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(meta.std, device=device).view(1, 3, 1, 1)
    monitor = load_monitor(cfg.monitor) if cfg.monitor is not None and where.rank == 0 else None
    board = _Board(cfg.out) if where.rank == 0 else None
    knn = None
    if monitor is not None:
        knn = partial(
            knn_monitor, model.method, monitor, cfg.num_classes, cfg.knn_k, device, mean, std
        )
    return _Reports(cfg, where.rank, where.world, history, board, knn)


def _train_epochs(
    cfg: WorkerConfig, where: _Rank, model: _Model, progress: _Progress, reports: _Reports
) -> None:
    """The epochs from the resume point: train one, save its checkpoint when due, report."""
    from sepp_ray.train.progress import write_progress
    from sepp_ray.train.resident import ResidentFeed, ResidentPlan

    data = cfg.data
    resident = ResidentFeed(data, where.device) if isinstance(data, ResidentPlan) else None
    stream = (
        None
        if isinstance(data, ResidentPlan)
        else data.stream(where.world, where.rank, progress.start)
    )
    model.method.train()
    epochs = data.epochs  # the plan's: a step budget may stop the last one part way
    for epoch in range(progress.start, epochs):
        t0 = time.perf_counter()
        batches = _epoch_batches(
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
    reports: _Reports,
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
