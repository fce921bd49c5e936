"""`sepp pretrain`: SSL pretraining with semantic positive pairs on Ray Train.

The driver checks every setting before reading data or taking cluster resources
(`PretrainConfig.validate`), then the dataset (split, labels, image size); it plans the data
(`sepp_ray.train.dataplane`: pair items written once by a Ray Data job, row groups counted in
tasks, no image bytes in the driver), resolves the run into one `WorkerConfig`, and runs a
TorchTrainer: DDP over ``workers`` (gloo on CPU, NCCL on GPUs), each rank streaming its rows of
every epoch through parallel decode tasks, ``FailureConfig`` restarts, and resume from the
newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from functools import partial
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.errors import SeppError
from sepp_ray.resources import ensure_gpus, gpu_wait
from sepp_ray.shared_storage import check_shared_storage
from sepp_ray.storage import (
    Location,
    absolute,
    begin_write,
    finish_write,
    ray_storage_filesystem,
    ray_storage_path,
    read_manifest,
)
from sepp_ray.train.config import PretrainConfig, WorkerConfig
from sepp_ray.train.items import plan_items

__all__ = ["PretrainConfig", "pretrain"]

log = logging.getLogger(__name__)


def _image_size(ds: ImageDataset, cfg: PretrainConfig) -> int:
    if cfg.image_size:
        return cfg.image_size
    size = ds.manifest.get("image_size", {})
    if size.get("uniform"):
        return int(size["width"][0])
    raise SeppError(f"{ds.uri} has images of several sizes: set image_size")


def _monitor(ds: ImageDataset, cfg: PretrainConfig, size: int) -> dict[str, Any] | None:
    """Bounded samples for the kNN monitor: train images as the memory bank, the validation
    split (``monitor_split``, never test) as queries; None when off or unlabeled."""
    from sepp_ray.train.dataplane import monitor_sets

    if not cfg.knn_monitor:
        return None
    splits = ds.manifest["splits"]
    if cfg.monitor_split not in splits:
        log.warning(
            "no %r split in %s: the kNN monitor is off (ingest with images.val_fraction > 0 "
            "to carve one from train)",
            cfg.monitor_split,
            cfg.dataset,
        )
        return None
    if splits[cfg.split]["labeled"] == 0 or splits[cfg.monitor_split]["labeled"] == 0:
        return None
    sets = monitor_sets(
        ds, cfg.split, cfg.monitor_split, size, cfg.knn_max_train, cfg.knn_max_test, cfg.seed
    )
    return {**sets, "split": cfg.monitor_split}


def _read_pairs_table(uri: str) -> Any:
    from sepp_ray.mining.tables import read_pairs

    return read_pairs(uri)


def _pair_uris(cfg: PretrainConfig) -> dict[str, str]:
    return {k: v for k, v in (("pairs", cfg.pairs.pairs), ("curated", cfg.pairs.curated)) if v}


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
    cfg.validate()  # every setting, before reading data or taking a Ray resource
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sepp_ray.data.recipes import get_recipe
    from sepp_ray.methods import fit_hparams, method_class
    from sepp_ray.ray_utils import init_ray
    from sepp_ray.train.dataplane import (
        ITEMS_DIR,
        DataPlan,
        decode_spec,
        item_table,
        training_chunks,
    )
    from sepp_ray.train.feed import FeedConfig
    from sepp_ray.train.plan import total_rows
    from sepp_ray.train.preflight import check_preflight
    from sepp_ray.train.state import CKPT_DIR, DIVERGED, latest_checkpoint
    from sepp_ray.train.step import pair_use_of_mode
    from sepp_ray.train.worker import train_loop

    cfg = _absolute_uris(cfg)
    ds = ImageDataset.open(cfg.dataset)
    if cfg.split not in ds.manifest["splits"]:
        raise SeppError(
            f"split {cfg.split!r} not in {cfg.dataset}; it has {list(ds.manifest['splits'])}"
        )
    size = _image_size(ds, cfg)
    method_cls = method_class(cfg.method)
    if method_cls.needs_labels and ds.manifest["splits"][cfg.split]["labeled"] == 0:
        raise SeppError(
            f"method {cfg.method} trains on class labels and split {cfg.split!r} of "
            f"{cfg.dataset} has none: pick another method or a labeled dataset"
        )
    recipe = get_recipe(cfg.recipe or method_cls.default_recipe, size, drop=tuple(cfg.drop_augment))
    spec = decode_spec(ds.manifest, size, recipe, cfg.pairs.max_positives, cfg.split)
    if cfg.decode_on == "gpu":
        if spec.mode != "full":
            raise SeppError(
                f"decode_on=gpu decodes whole images, but {cfg.dataset} is not stored at the "
                f"training size {size}: ingest with images.resize={size} "
                "images.center_crop=true images.encoding=jpeg, or decode_on=cpu"
            )
        spec = replace(spec, mode="bytes")
    pairs = _read_pairs_table(cfg.pairs.pairs) if cfg.pairs.pairs else None
    curated = None
    if cfg.pairs.curated:
        loc = Location(cfg.pairs.curated)
        with loc.fs.open(loc.path, "rb") as f:
            curated = pq.read_table(f, columns=["image_a", "image_b"])
    plan = plan_items(pairs, curated, cfg.pairs, cfg.seed)
    pair_use = pair_use_of_mode(cfg.pairs.mode) if pairs is not None else "none"
    multi_positive = pair_use != "none"
    init_ray()
    check_shared_storage({"dataset": cfg.dataset, "out": cfg.out, **_pair_uris(cfg)})
    wait = gpu_wait(cfg.gpu_wait_s)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    # told to wait for GPUs, a run on a cluster scaled to zero GPU nodes still trains on GPUs
    use_gpu = (bool(gpus) or wait > 0) if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu:
        gpus = ensure_gpus(
            cfg.workers,
            wait,
            what="GPU workers",
            fix="lower workers",
            cpus_per_gpu=cfg.cpus_per_worker,
        )
    _check_decode_cpus(cfg)
    # a complete run is final; a crashed one keeps its checkpoints and resumes from them
    keep = (CKPT_DIR, "tensorboard", ITEMS_DIR) if not cfg.overwrite else ()
    if not cfg.overwrite:
        _check_resumable(cfg)
    loc = begin_write(cfg.out, overwrite=cfg.overwrite, keep=keep)
    resumed = latest_checkpoint(cfg.out)
    item_files = item_table(plan, ds, cfg.split, cfg.out, cfg.seed)
    exclude = ray.put(plan.exclude) if len(plan.exclude) else None
    chunks = training_chunks(ds, plan, item_files, cfg.split, exclude)
    n_items = total_rows(chunks)
    counts = {**plan.counts, "original": n_items - plan.rows if plan.originals else 0}
    if n_items < cfg.batch_size:
        raise SeppError(
            f"batch_size {cfg.batch_size} exceeds the {n_items} training items: lower it"
        )
    steps_per_epoch = n_items // cfg.batch_size
    total_steps = cfg.budget_steps or steps_per_epoch * cfg.epochs
    data = DataPlan(
        chunks=chunks,
        spec=replace(spec, exclude=exclude),
        feed=FeedConfig(
            local_batch=cfg.batch_size // cfg.workers,
            buffer_rows=cfg.shuffle_buffer,
            read_ahead=cfg.read_ahead,
            task_cpus=cfg.decode_cpus,
        ),
        global_batch=cfg.batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        seed=cfg.seed,
    )
    epochs = data.epochs
    # a queue (MoCo) or support set (NNCLR) never longer than an epoch of items
    hparams = fit_hparams(cfg.method, cfg.hparams, n_items)
    optim = cfg.optim_recipe()
    lr = optim.peak_lr(cfg.batch_size)
    monitor = _monitor(ds, cfg, size)
    worker = WorkerConfig(
        method=cfg.method,
        backbone=cfg.backbone,
        cifar_stem=cfg.cifar_stem,
        hparams=hparams,
        image_size=size,
        recipe=recipe,
        seed=cfg.seed,
        sync_bn=cfg.sync_bn,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        amp=cfg.amp,
        pair_use=pair_use,
        optim=optim,
        lr=lr,
        warmup_steps=min(optim.warmup_steps(steps_per_epoch, epochs), total_steps - 1),
        data=data,
        workers=cfg.workers,
        preflight=cfg.preflight,
        preflight_limit_gb=cfg.preflight_limit_gb,
        dataset=cfg.dataset,
        split=cfg.split,
        out=cfg.out,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        monitor=monitor,
        knn_every=cfg.knn_every,
        knn_k=cfg.knn_k,
        num_classes=max(1, len(ds.classes)),
    )
    storage = Location(cfg.out).child("_ray")
    run_config = RunConfig(
        name="train",
        storage_path=ray_storage_path(storage.uri),
        storage_filesystem=ray_storage_filesystem(storage.uri),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        callbacks=callbacks,
    )
    trainer = TorchTrainer(
        partial(train_loop, worker),  # the one typed object every rank reads
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=run_config,
    )
    t0 = time.perf_counter()
    from sepp_ray.train.progress import ProgressBar

    with ProgressBar(cfg.out, epochs, resumed[0] if resumed else 0):
        result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise SeppError(f"training failed: {result.error}")
    check_preflight(loc)  # a local batch too big for the GPUs: the error rank 0 left
    if loc.exists(DIVERGED):
        error = json.loads(loc.read_bytes(DIVERGED))["error"]
        loc.fs.rm(loc.join(DIVERGED))
        raise SeppError(
            f"{error}. The last good checkpoint is kept in "
            f"{cfg.out}/{CKPT_DIR}; lower the learning rate or check the data."
        )
    final = latest_checkpoint(cfg.out)
    if final is None or final[0] != epochs:
        raise SeppError(f"training ended without its final checkpoint in {cfg.out}")
    ckpt = read_manifest(final[1])
    history, starts, nodes = _history(final[1])
    manifest = {
        "kind": "pretrain",
        "final_checkpoint": final[1],
        "epochs": cfg.epochs,
        "epochs_run": epochs,
        "budget_steps": cfg.budget_steps,
        "total_steps": total_steps,
        "hparams": hparams,
        "decode": spec.mode,
        "resumed_from_epoch": resumed[0] if resumed else 0,
        "items": counts,
        "multi_positive": multi_positive,
        "steps_per_epoch": steps_per_epoch,
        "lr": lr,
        "optim": optim.to_dict(),
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


def _check_decode_cpus(cfg: PretrainConfig) -> None:
    """Decoding runs in Ray tasks beside the training workers: a cluster whose CPUs the
    workers take entirely would leave every read task pending forever."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0))
    spare = cpus - cfg.workers * cfg.cpus_per_worker
    if spare < cfg.decode_cpus:
        raise SeppError(
            f"{cfg.workers} workers x {cfg.cpus_per_worker} CPUs leave {spare:g} of the "
            f"cluster's {cpus:g} CPUs for decoding, which needs {cfg.decode_cpus:g} per task: "
            "lower cpus_per_worker or decode_cpus, or add CPUs"
        )


def _check_resumable(cfg: PretrainConfig) -> None:
    """A run resumes only into the same model and optimiser; anything else would fail deep in
    ``load_state_dict`` on a worker. Say so before any worker starts."""
    from sepp_ray.train.state import latest_checkpoint

    found = latest_checkpoint(cfg.out)
    if found is None:
        return
    saved = read_manifest(found[1])
    optimizer = cfg.optim_recipe().optimizer  # the resolved name, as the worker saves it
    now = {"method": cfg.method, "backbone": cfg.backbone, "optimizer": optimizer}
    was = {
        "method": saved.get("method"),
        "backbone": (saved.get("backbone") or {}).get("name"),
        "optimizer": saved.get("optimizer", optimizer),
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
