"""The per-worker training loop that Ray Train runs on every rank.

Every rank builds the same method, resumes from the newest complete checkpoint when one exists
(after a lost worker, or a re-run after a crash), trains its shard of the items and calls
``ray.train.report`` once per epoch, so all ranks report the same number of times. Only rank 0
writes files: checkpoints, TensorBoard logs. The models and losses know nothing of this module.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from sepp_ray.train.config import WorkerConfig

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


def _pinned(batches: Any) -> Any:
    """numpy batches -> tensors in pinned (page-locked) host memory, so the copy to the GPU can
    run asynchronously (`non_blocking=True`); JPEG-byte batches pass through."""
    for b in batches:
        if "image_bytes" in b:
            yield b
        else:
            yield {k: torch.from_numpy(v).pin_memory() for k, v in b.items()}


def _on_device(batches: Any, device: torch.device, pin_ahead: int = 2) -> Any:
    """numpy batches -> tensors on `device`. On CUDA the pinning copy runs `pin_ahead` batches
    ahead in a thread (a host memcpy of the whole batch, tens of ms at 224 px, kept off the
    step's thread) and the host-to-device copy is asynchronous. Batches of JPEG bytes
    (``decode_on=gpu``) are decoded on the device."""
    from sepp_ray.train.feed import decode_on_device, prefetched

    if device.type == "cuda":
        batches = prefetched(_pinned(batches), pin_ahead)
    for b in batches:
        if "image_bytes" in b:
            yield decode_on_device(b, device)
            continue
        if device.type == "cuda":
            yield {k: v.to(device, non_blocking=True) for k, v in b.items()}
        else:
            yield {k: torch.from_numpy(v) for k, v in b.items()}


def train_loop(cfg: WorkerConfig) -> None:
    """Ray Train's ``train_loop_per_worker``; ``cfg`` is the run the driver resolved."""
    import ray.train
    import ray.train.torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from sepp_ray import dist
    from sepp_ray.data.augment import GPUAugment
    from sepp_ray.methods import create_method
    from sepp_ray.models.checkpoint import BackboneMeta
    from sepp_ray.storage import Location
    from sepp_ray.train.preflight import run_preflight
    from sepp_ray.train.progress import write_progress
    from sepp_ray.train.rng import rng_state, seed_everything, set_rng_state
    from sepp_ray.train.state import (
        DIVERGED,
        latest_checkpoint,
        load_training_state,
        save_training_checkpoint,
    )
    from sepp_ray.train.step import (
        NonFiniteLossError,
        StepConfig,
        Trainer,
        prepare_loss_module,
        train_epoch,
    )

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed = seed_everything(cfg.seed, rank)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    method = create_method(
        cfg.method, backbone=cfg.backbone, cifar_stem=cfg.cifar_stem, **cfg.hparams
    )
    torch.manual_seed(seed)
    if cfg.sync_bn and world > 1:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    cuda = device.type == "cuda"
    if cuda:  # fixed input shapes: let cuDNN time its convolution algorithms once and keep the best
        torch.backends.cudnn.benchmark = True
    channels_last = cfg.channels_last and cuda
    loss_module = prepare_loss_module(method, device, channels_last=channels_last)
    model: torch.nn.Module = loss_module
    if world > 1:
        model = DistributedDataParallel(
            loss_module, device_ids=[device.index] if cuda else None, broadcast_buffers=False
        )
    if cfg.compile:
        # compiled around DDP, as the DDP notes ask ("apply the DDP model wrapper before
        # compiling the model"): TorchDynamo's DDPOptimizer then splits the graph at DDP's
        # bucket boundaries, so gradient all-reduce still overlaps the backward. The step has
        # no host sync after its first (sepp_ray.train.step), so no graph breaks on one.
        model = torch.compile(model)  # type: ignore[assignment]
    data = cfg.data
    recipe = cfg.recipe
    # crop decoding: each view's crop was taken on the CPU from the stored image
    gpu_recipe = recipe.with_drop(("crop",)) if data.spec.mode == "crop" else recipe
    augment = GPUAugment(gpu_recipe, seed=seed, channels_last=channels_last)
    optim = cfg.optim
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
    if run_preflight(
        trainer,
        rank,
        out=cfg.out,
        local_batch=data.feed.local_batch,
        image_size=cfg.image_size,
        workers=cfg.workers,
        backbone=cfg.backbone,
        limit_gb=cfg.preflight_limit_gb,
        enabled=cfg.preflight,
    ):
        return  # the local batch does not fit the device: rank 0 left the error for the driver
    start_epoch, history, starts = 0, [], []
    latest = latest_checkpoint(cfg.out)
    if latest is not None:
        state, _ = load_training_state(latest[1])
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0], augment, device)
        start_epoch, history = int(state["epoch"]), list(state["history"])
        starts = list(state.get("starts", []))
        if rank == 0:
            print(f"[sepp] resuming from {latest[1]} (epoch {start_epoch})", flush=True)
    starts.append(start_epoch)  # one entry per (re)start of this loop: recovery is visible
    nodes: list[Any] = [ray.get_runtime_context().get_node_id()]
    if dist.is_dist():  # which node each rank runs on, recorded in the run's manifest
        nodes = [None] * world
        tdist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    meta = BackboneMeta(
        cfg.backbone,
        cfg.cifar_stem,
        method.feat_dim,
        cfg.image_size,
        tuple(recipe.view1.mean),  # type: ignore[arg-type]
        tuple(recipe.view1.std),  # type: ignore[arg-type]
    )
    mean = torch.tensor(meta.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(meta.std, device=device).view(1, 3, 1, 1)
    monitor = load_monitor(cfg.monitor) if cfg.monitor is not None and rank == 0 else None
    board = _Board(cfg.out) if rank == 0 else None
    method.train()
    epochs = data.epochs  # the plan's: a step budget may stop the last one part way
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        steps = data.steps_in(epoch)
        batches = _on_device(data.batches(epoch, world, rank), device)
        try:
            stats = train_epoch(trainer, batches, epoch, start_step=epoch * data.steps_per_epoch)
        except NonFiniteLossError as e:
            # every rank stops here together (the check is collective); rank 0 leaves the reason
            # where the driver looks, since a raise would make Ray Train retry the same divergence
            if rank == 0:
                Location(cfg.out).write_bytes(DIVERGED, json.dumps({"error": str(e)}).encode())
            return
        if int(stats["steps"]) != steps:
            raise RuntimeError(f"rank {rank} got {stats['steps']} of {steps} steps")
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": stats["loss"],
            "lr": stats["lr"],
            "pairs_per_s": stats["pairs_per_s"] * world,
            "epoch_seconds": time.perf_counter() - t0,
        }
        if monitor is not None and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == epochs):
            if rank == 0:
                knn = knn_monitor(method, monitor, cfg.num_classes, cfg.knn_k, device, mean, std)
                metrics["knn_top1"], metrics["knn_top5"] = knn["top1"], knn["top5"]
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        save_now = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == epochs
        if save_now:
            rngs = [rng_state(augment, device)]
            if dist.is_dist():
                gathered: list[Any] = [None] * world
                tdist.all_gather_object(gathered, rngs[0])
                rngs = gathered
            if rank == 0:
                state = {
                    "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": rngs,
                    "epoch": epoch + 1,
                    "history": history,
                    "starts": starts,
                    "nodes": nodes,
                }
                save_training_checkpoint(
                    cfg.out,
                    epoch + 1,
                    method.backbone,
                    meta,
                    state,
                    {
                        "method": cfg.method,
                        "optimizer": optim.optimizer,
                        "metrics": history[-1],
                        "dataset": {"uri": cfg.dataset, "split": cfg.split},
                    },
                    keep=cfg.keep_checkpoints,
                )
            if dist.is_dist():
                tdist.barrier()
        if board is not None:
            board.log(metrics, epoch + 1)
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch")
            print(f"[sepp] epoch {epoch + 1}/{epochs} {shown}", flush=True)
            write_progress(cfg.out, epoch + 1, epochs, metrics)
        ray.train.report(metrics)
