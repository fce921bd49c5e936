"""`sepp pretrain`: SSL pretraining with semantic positive pairs on Ray Train.

The driver checks everything it can before taking cluster resources (method, hyperparameters,
pairs against the dataset, batch size), builds the training items, decodes them once with Ray
Data (kept in the object store), and runs a TorchTrainer: DDP over ``workers`` (gloo on CPU,
NCCL on GPUs), ``FailureConfig`` restarts, and resume from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from sepp_ray.config import opt
from sepp_ray.data.dataset import ImageDataset
from sepp_ray.errors import SeppError
from sepp_ray.storage import Location, absolute, begin_write, finish_write, read_manifest
from sepp_ray.train.items import PairsConfig, build_items

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    dataset: str = opt("", "an image dataset URI (the output of `sepp ingest`)")
    out: str = opt("", "output URI: checkpoints/, tensorboard/, manifest")
    split: str = opt("train", "the split to train on")
    method: str = opt("simclr", "SSL method (see `sepp_ray.methods.list_methods()`)")
    backbone: str = opt("resnet18", "timm model name")
    cifar_stem: bool = opt(True, "3x3 stride-1 first conv, no max-pool (32 px data)")
    image_size: int | None = opt(None, "training resolution (default: the dataset's size)")
    hparams: dict[str, Any] = opt({}, "method hyperparameter overrides, e.g. {temperature: 0.5}")
    recipe: str | None = opt(None, "augmentation recipe (default: the method's own)")
    drop_augment: list[str] = opt(
        [],
        "transforms to remove: crop, flip, jitter, grayscale, "
        "blur, solarize (the transformation ablation)",
    )
    epochs: int = opt(100, "training epochs")
    batch_size: int = opt(512, "global batch (items; each yields two views)")
    optimizer: str = opt("lars", "lars, sgd or adamw")
    base_lr: float = opt(0.3, "learning rate at batch 256, scaled by lr_scaling")
    lr_scaling: str = opt("linear", "linear, sqrt or none (lr = base_lr x batch / 256)")
    final_lr: float = opt(0.0, "learning rate at the end of the cosine schedule")
    weight_decay: float = opt(1e-6, "weight decay (not on biases and norm layers)")
    warmup_epochs: int = opt(10, "linear warm-up epochs")
    grad_clip: float | None = opt(None, "gradient norm clip")
    workers: int = opt(1, "Ray Train workers (one GPU each when use_gpu)")
    use_gpu: bool | None = opt(None, "default: when the cluster has GPUs")
    cpus_per_worker: float = opt(1.0, "CPUs reserved per training worker")
    amp: str = opt("auto", "auto (bf16 on GPU), bf16 or off")
    channels_last: bool = opt(True, "channels_last memory format on GPU")
    compile: bool = opt(False, "torch.compile the model")
    sync_bn: bool = opt(False, "synchronised BatchNorm across workers")
    shuffle_buffer: int = opt(10_000, "local shuffle buffer of items per worker (0: none)")
    checkpoint_every: int = opt(10, "epochs between checkpoints (the last epoch always)")
    keep_checkpoints: int = opt(2, "newest checkpoints kept")
    gpu_wait_s: float = opt(
        0.0,
        "use_gpu with fewer GPUs than workers: ask the autoscaler for them and wait this long "
        "(set it on an autoscaling cluster, e.g. 900); 0: fail at once",
    )
    max_failures: int = opt(3, "worker failures to recover from (resume from a checkpoint)")
    knn_monitor: bool = opt(True, "kNN accuracy on the test split during training")
    knn_every: int = opt(5, "epochs between kNN monitor evaluations (and the last)")
    knn_k: int = opt(200, "neighbours of the kNN monitor")
    knn_max_train: int = opt(10_000, "at most this many train images in the kNN monitor")
    knn_max_test: int = opt(2_000, "at most this many test images in the kNN monitor")
    seed: int = opt(0, "seed of weights, augmentation and shuffling")
    overwrite: bool = opt(False, "start over, replacing a complete run at `out`")
    pairs: PairsConfig = field(default_factory=PairsConfig)

    def validate(self) -> None:
        from sepp_ray.data.recipes import check_drop
        from sepp_ray.methods import make_hparams
        from sepp_ray.train.optim import scaled_lr

        if not self.dataset or not self.out:
            raise SeppError("pretrain needs DATASET and OUT (see `sepp pretrain --help`)")
        make_hparams(self.method, **self.hparams)
        check_drop(tuple(self.drop_augment))
        scaled_lr(self.base_lr, self.batch_size, rule=self.lr_scaling)
        if self.optimizer not in ("lars", "sgd", "adamw"):
            raise SeppError(f"optimizer must be lars, sgd or adamw, got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "workers", "checkpoint_every", "knn_every"):
            if getattr(self, name) < 1:
                raise SeppError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.workers:
            raise SeppError(
                f"batch_size {self.batch_size} must divide evenly over {self.workers} workers"
            )
        self.pairs.validate()


def _image_size(ds: ImageDataset, cfg: PretrainConfig) -> int:
    if cfg.image_size:
        return cfg.image_size
    size = ds.manifest.get("image_size", {})
    if size.get("uniform"):
        return int(size["width"][0])
    raise SeppError(f"{ds.uri} has images of several sizes: set image_size")


def _decode_uint8(blobs: list[bytes], size: int) -> np.ndarray:
    from sepp_ray.train.decode import _decode

    return (
        np.stack([_decode(b, size) for b in blobs])
        if blobs
        else np.zeros((0, size, size, 3), np.uint8)
    )


def _sample(table: Any, n: int, seed: int) -> Any:
    """A seeded random subset of ``n`` rows: shards are often grouped by class (an ImageFolder
    tree is read folder by folder), so the first rows would hold only a few classes."""
    if table.num_rows <= n:
        return table
    keep = np.sort(np.random.default_rng(seed).choice(table.num_rows, n, replace=False))
    return table.take(keep)


def _monitor(ds: ImageDataset, cfg: PretrainConfig, size: int) -> dict[str, np.ndarray] | None:
    """Small un-augmented labeled sets for the kNN monitor; None when there are no labels."""
    if not cfg.knn_monitor or "test" not in ds.manifest["splits"]:
        return None
    if (
        ds.manifest["splits"][cfg.split]["labeled"] == 0
        or ds.manifest["splits"]["test"]["labeled"] == 0
    ):
        return None
    tr = _sample(ds.read_table(["image", "label"], split=cfg.split), cfg.knn_max_train, cfg.seed)
    te = _sample(ds.read_table(["image", "label"], split="test"), cfg.knn_max_test, cfg.seed + 1)
    return {
        "train_images": _decode_uint8(tr["image"].to_pylist(), size),
        "train_labels": tr["label"].fill_null(-1).to_numpy().astype(np.int64),
        "test_images": _decode_uint8(te["image"].to_pylist(), size),
        "test_labels": te["label"].fill_null(-1).to_numpy().astype(np.int64),
    }


def _read_pairs_table(uri: str) -> Any:
    from sepp_ray.mining.pairs_report import read_pairs

    return read_pairs(uri)


def _absolute_uris(cfg: PretrainConfig) -> PretrainConfig:
    p = cfg.pairs
    pairs = replace(
        p,
        pairs=absolute(p.pairs) if p.pairs else p.pairs,
        curated=absolute(p.curated) if p.curated else p.curated,
    )
    return replace(cfg, dataset=absolute(cfg.dataset), out=absolute(cfg.out), pairs=pairs)


def pretrain(cfg: PretrainConfig, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the run's manifest.

    ``callbacks``: Ray Train callbacks for the run, e.g. the one by which a sweep trial
    forwards each epoch's metrics (the kNN monitor) to Tune's scheduler (``sweep_trial``).
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sepp_ray.ray_utils import init_ray
    from sepp_ray.train.decode import DecodeItems
    from sepp_ray.train.optim import scaled_lr
    from sepp_ray.train.state import CKPT_DIR, DIVERGED, latest_checkpoint
    from sepp_ray.train.worker import train_loop

    cfg.validate()
    cfg = _absolute_uris(cfg)
    ds = ImageDataset.open(cfg.dataset)
    if cfg.split not in ds.manifest["splits"]:
        raise SeppError(
            f"split {cfg.split!r} not in {cfg.dataset}; it has {list(ds.manifest['splits'])}"
        )
    size = _image_size(ds, cfg)
    images = ds.read_table(["id", "image"], split=cfg.split)
    pairs = _read_pairs_table(cfg.pairs.pairs) if cfg.pairs.pairs else None
    curated = None
    if cfg.pairs.curated:
        loc = Location(cfg.pairs.curated)
        with loc.fs.open(loc.path, "rb") as f:
            curated = pq.read_table(f)
    items, counts = build_items(images, pairs, cfg.pairs, curated)
    if items.num_rows < cfg.batch_size:
        raise SeppError(
            f"batch_size {cfg.batch_size} exceeds the {items.num_rows} training items: lower it"
        )
    multi_positive = cfg.pairs.mode in ("multi_positive", "both") and pairs is not None
    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = bool(gpus) if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and gpus < cfg.workers:
        gpus = _wait_for_gpus(cfg)
    # a complete run is final; a crashed one keeps its checkpoints and resumes from them
    keep = (CKPT_DIR, "tensorboard") if not cfg.overwrite else ()
    if not cfg.overwrite:
        _check_resumable(cfg)
    loc = begin_write(cfg.out, overwrite=cfg.overwrite, keep=keep)
    resumed = latest_checkpoint(cfg.out)
    steps_per_epoch = items.num_rows // cfg.batch_size
    lr = scaled_lr(cfg.base_lr, cfg.batch_size, rule=cfg.lr_scaling)
    monitor = _monitor(ds, cfg, size)
    max_pos = cfg.pairs.max_positives
    decoder = DecodeItems(size, max_pos)
    rds = (
        ray.data.from_arrow(items)
        .map_batches(lambda b: decoder(b), batch_format="pyarrow", batch_size=256)
        .materialize()
    )
    loop_cfg = {
        **{k: v for k, v in asdict(cfg).items() if k != "pairs"},
        "image_size": size,
        "lr": lr,
        "multi_positive": multi_positive,
        "local_batch": cfg.batch_size // cfg.workers,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * cfg.epochs,
        "warmup_steps": steps_per_epoch * min(cfg.warmup_epochs, cfg.epochs - 1),
        "monitor": ray.put(monitor) if monitor is not None else None,
        "num_classes": max(1, len(ds.classes)),
    }
    storage = Location(cfg.out).child("_ray")
    run_config = RunConfig(
        name="train",
        storage_path=_storage_path(storage.uri),
        storage_filesystem=_storage_fs(storage.uri),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        callbacks=callbacks,
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        datasets={"train": rds},
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=run_config,
    )
    t0 = time.perf_counter()
    from sepp_ray.train.progress import ProgressBar

    with ProgressBar(cfg.out, cfg.epochs, resumed[0] if resumed else 0):
        result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise SeppError(f"training failed: {result.error}")
    if loc.exists(DIVERGED):
        error = json.loads(loc.read_bytes(DIVERGED))["error"]
        loc.fs.rm(loc.join(DIVERGED))
        raise SeppError(
            f"{error}. The last good checkpoint is kept in "
            f"{cfg.out}/{CKPT_DIR}; lower the learning rate or check the data."
        )
    final = latest_checkpoint(cfg.out)
    if final is None or final[0] != cfg.epochs:
        raise SeppError(f"training ended without its final checkpoint in {cfg.out}")
    ckpt = read_manifest(final[1])
    history, starts, nodes = _history(final[1])
    manifest = {
        "kind": "pretrain",
        "final_checkpoint": final[1],
        "epochs": cfg.epochs,
        "resumed_from_epoch": resumed[0] if resumed else 0,
        "items": counts,
        "multi_positive": multi_positive,
        "steps_per_epoch": steps_per_epoch,
        "lr": lr,
        "image_size": size,
        "use_gpu": use_gpu,
        "workers": cfg.workers,
        "worker_nodes": nodes,
        "wall_seconds": round(wall, 2),
        "final_metrics": ckpt.get("metrics"),
        "history": history,
        "loop_starts_at_epoch": starts,
        "config": asdict(cfg),
        "pairs_per_s_mean": float(np.mean([h.get("pairs_per_s", 0) for h in history]))
        if history
        else math.nan,
    }
    finish_write(loc, manifest)
    return manifest


def _wait_for_gpus(cfg: PretrainConfig) -> int:
    """Ask the autoscaler for one GPU bundle per worker and wait until the cluster has them
    (an autoscaling cluster may start with fewer GPU nodes than a run needs)."""
    import ray
    from ray.autoscaler.sdk import request_resources

    def have() -> int:
        return int(ray.cluster_resources().get("GPU", 0))

    if cfg.gpu_wait_s > 0:
        request_resources(bundles=[{"GPU": 1, "CPU": cfg.cpus_per_worker}] * cfg.workers)
        log.warning(
            "waiting up to %.0f s for %d GPUs (have %d)", cfg.gpu_wait_s, cfg.workers, have()
        )
        deadline = time.monotonic() + cfg.gpu_wait_s
        while have() < cfg.workers and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
        request_resources(bundles=[])  # the request has served: idle nodes may go again
    if have() < cfg.workers:
        waited = f" after waiting {cfg.gpu_wait_s:.0f} s" if cfg.gpu_wait_s > 0 else ""
        raise SeppError(
            f"{cfg.workers} GPU workers asked for, the cluster has {have()} GPUs{waited}: "
            "lower workers, raise the GPU nodes' min_workers, or set gpu_wait_s on an "
            "autoscaling cluster"
        )
    return have()


def _check_resumable(cfg: PretrainConfig) -> None:
    """A run resumes only into the same model and optimiser; anything else would fail deep in
    ``load_state_dict`` on a worker. Say so before any worker starts."""
    from sepp_ray.train.state import latest_checkpoint

    found = latest_checkpoint(cfg.out)
    if found is None:
        return
    saved = read_manifest(found[1])
    now = {"method": cfg.method, "backbone": cfg.backbone, "optimizer": cfg.optimizer}
    was = {
        "method": saved.get("method"),
        "backbone": (saved.get("backbone") or {}).get("name"),
        "optimizer": saved.get("optimizer", cfg.optimizer),
    }
    diff = {k: (was[k], now[k]) for k in now if was[k] != now[k]}
    if diff:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise SeppError(
            f"{cfg.out} holds checkpoints of an unfinished run that this config cannot resume "
            f"({shown}): keep its settings to resume, or pass overwrite=true / another out"
        )


def _history(ckpt_uri: str) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    """(per-epoch metrics, epochs at which the loop (re)started, node id of each rank)."""
    from sepp_ray.train.state import load_training_state

    state, _ = load_training_state(ckpt_uri)
    return (
        list(state.get("history", [])),
        list(state.get("starts", [])),
        list(state.get("nodes", [])),
    )


def _storage_path(uri: str) -> str:
    from sepp_ray.storage import filesystem, is_remote

    return filesystem(uri)[1] if is_remote(uri) else Location(uri).path


def _storage_fs(uri: str) -> Any:
    from sepp_ray.storage import filesystem, is_remote

    if not is_remote(uri):
        return None
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem(uri)[0]))
