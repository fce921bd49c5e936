"""`sepp pretrain`: SSL pretraining with semantic positive pairs on Ray Train.

The driver checks every setting before reading data or taking cluster resources
(`PretrainConfig.validate`), then the dataset (split, labels, image size); it plans the data
(`sepp_ray.train.dataplane`: pair items written once by a Ray Data job, row groups counted in
tasks, no image bytes in the driver), resolves the run into one `WorkerConfig`, and runs a
TorchTrainer: DDP over ``workers`` (gloo on CPU, NCCL on GPUs), each rank streaming its rows of
every epoch through parallel decode tasks, ``FailureConfig`` restarts, and checkpoints through
Ray Train (`sepp_ray.train.ray_checkpoints`): kept by the kNN monitor, resumed from after a lost
worker, and the whole run restored when the same command runs again after the driver died.
`pretrain` tells the run in steps, one function each.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.errors import SeppError
from sepp_ray.resources import ensure_gpus, gpu_wait
from sepp_ray.shared_storage import check_shared_storage
from sepp_ray.storage import (
    Location,
    absolute,
    begin_write,
    finish_write,
    read_manifest,
)
from sepp_ray.train import planning
from sepp_ray.train.config import PretrainConfig, WorkerConfig
from sepp_ray.train.items import ItemPlan, plan_items

if TYPE_CHECKING:
    from ray.train import Result

    from sepp_ray.data.recipes import TwoViewRecipe
    from sepp_ray.train.dataplane import DataPlan
    from sepp_ray.train.feed import DecodeSpec
    from sepp_ray.train.resident import PlaneChoice, ResidentPlan
    from sepp_ray.train.schedule import Schedule

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


@dataclass(frozen=True)
class _Run:
    """A resolved run: what every worker gets, and what the manifest says of its plan."""

    worker: WorkerConfig
    spec: DecodeSpec
    counts: dict[str, int]
    schedule: Schedule
    crowded: str | None
    use_gpu: bool


def pretrain(cfg: PretrainConfig, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the run's manifest.

    ``callbacks``: Ray Train callbacks for the run, e.g. the one by which a sweep trial
    forwards each epoch's metrics (the kNN monitor) to Tune's scheduler (``sweep_trial``).
    """
    cfg.validate()  # every setting, before reading data or taking a Ray resource
    cfg = _absolute_uris(cfg)
    ds = _open_dataset(cfg)
    size = _image_size(ds, cfg)
    recipe, spec = _recipe_and_spec(cfg, ds, size)
    plan, pair_use = _item_plan(cfg)
    use_gpu = _claim_cluster(cfg)
    choice = planning.choose_plane(cfg, ds, use_gpu)
    if choice.mode == "stream":  # a resident split is decoded once, before the workers start
        planning.check_decode_cpus(cfg)
    loc, resumed = _claim_output(cfg)
    run = _resolve(cfg, ds, plan, (recipe, spec), size, pair_use, choice, use_gpu)
    result, wall = _fit(cfg, run, callbacks, resumed)
    final = _final_checkpoint(cfg, loc, result, run.worker.data.epochs)
    manifest = _manifest(cfg, run, final, resumed, wall, result)
    finish_write(loc, manifest)
    return manifest


def _open_dataset(cfg: PretrainConfig) -> ImageDataset:
    """The dataset, refused when it lacks the split, or the labels the method trains on."""
    from sepp_ray.methods import method_class

    ds = ImageDataset.open(cfg.dataset)
    if cfg.split not in ds.manifest["splits"]:
        raise SeppError(
            f"split {cfg.split!r} not in {cfg.dataset}; it has {list(ds.manifest['splits'])}"
        )
    if method_class(cfg.method).needs_labels and ds.manifest["splits"][cfg.split]["labeled"] == 0:
        raise SeppError(
            f"method {cfg.method} trains on class labels and split {cfg.split!r} of "
            f"{cfg.dataset} has none: pick another method or a labeled dataset"
        )
    return ds


def _recipe_and_spec(
    cfg: PretrainConfig, ds: ImageDataset, size: int
) -> tuple[TwoViewRecipe, DecodeSpec]:
    """The augmentation recipe, and how the stored images are decoded for it."""
    from sepp_ray.data.recipes import get_recipe
    from sepp_ray.methods import method_class
    from sepp_ray.train.dataplane import decode_spec

    name = cfg.recipe or method_class(cfg.method).default_recipe
    recipe = get_recipe(name, size, drop=tuple(cfg.drop_augment))
    # decode_on=gpu: JPEG bytes to the device, whole images at the training size, else cropped there
    spec = decode_spec(
        ds.manifest, size, recipe, cfg.pairs.max_positives, cfg.split, decode_on=cfg.decode_on
    )
    return recipe, spec


def _item_plan(cfg: PretrainConfig) -> tuple[ItemPlan, str]:
    """The pair items (mined and curated pairs, as image ids) and how the loss uses pairs."""
    from sepp_ray.train.step import pair_use_of_mode

    pairs = _read_pairs_table(cfg.pairs.pairs) if cfg.pairs.pairs else None
    from sepp_ray.train.items import read_curated

    curated = read_curated(cfg.pairs.curated) if cfg.pairs.curated else None
    plan = plan_items(pairs, curated, cfg.pairs, cfg.seed)
    pair_use = pair_use_of_mode(cfg.pairs.mode) if pairs is not None else "none"
    return plan, pair_use


def _claim_cluster(cfg: PretrainConfig) -> bool:
    """Connect to Ray, check the run's storage is shared, and wait for the GPUs the workers
    need; returns whether the workers train on GPUs."""
    import ray

    from sepp_ray.ray_utils import init_ray

    init_ray()
    check_shared_storage({"dataset": cfg.dataset, "out": cfg.out, **_pair_uris(cfg)})
    wait = gpu_wait(cfg.gpu_wait_s)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    # told to wait for GPUs, a run on a cluster scaled to zero GPU nodes still trains on GPUs
    use_gpu = (bool(gpus) or wait > 0) if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu:
        ensure_gpus(
            cfg.workers,
            wait,
            what="GPU workers",
            fix="lower workers",
            cpus_per_gpu=cfg.cpus_per_worker,
        )
    return use_gpu


def _claim_output(cfg: PretrainConfig) -> tuple[Location, tuple[int, str] | None]:
    """Claim the output. A complete run is final; a crashed one keeps its checkpoints and
    Ray Train's snapshot beside them, from which Ray restores it: returns the checkpoint it
    resumes from."""
    from sepp_ray.train.dataplane import ITEMS_DIR
    from sepp_ray.train.ray_checkpoints import restored_from
    from sepp_ray.train.remine import ROUNDS_DIR
    from sepp_ray.train.state import CKPT_DIR

    keep = (CKPT_DIR, "tensorboard", ITEMS_DIR, ROUNDS_DIR) if not cfg.overwrite else ()
    if not cfg.overwrite:
        _check_resumable(cfg)
    loc = begin_write(cfg.out, overwrite=cfg.overwrite, keep=keep)
    return loc, restored_from(cfg.out)


def _resolve(
    cfg: PretrainConfig,
    ds: ImageDataset,
    plan: ItemPlan,
    augment: tuple[TwoViewRecipe, DecodeSpec],
    size: int,
    pair_use: str,
    choice: PlaneChoice,
    use_gpu: bool,
) -> _Run:
    """Plan the data (resident or streamed), the schedule that follows the plain run, and the
    kNN monitor; resolve it all into the one `WorkerConfig` every rank reads."""
    from sepp_ray.train.budget import pair_share_warning, split_size
    from sepp_ray.train.schedule import plan_schedule

    recipe, spec = augment
    plan_data = planning.resident_plan if choice.mode == "resident" else planning.stream_plan
    data = plan_data(cfg, ds, plan, spec, choice)
    counts = {**plan.counts, "original": data.rows - plan.rows if plan.originals else 0}
    optim = cfg.optim_recipe()
    # every schedule and data-sized buffer follows the plain run, whatever the arm
    schedule = plan_schedule(
        cfg.method,
        cfg.hparams,
        optim,
        images=split_size(ds.manifest, cfg.split),
        items=data.rows,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        budget_steps=cfg.budget_steps,
        backbone=cfg.backbone,
    )
    crowded = pair_share_warning(counts)
    if crowded:
        log.warning(crowded)
    remine = planning.remining(cfg, ds, choice, data.epochs)
    worker = replace(_worker_config(cfg, ds, data, recipe, size, pair_use, schedule), remine=remine)
    return _Run(worker, spec, counts, schedule, crowded, use_gpu)


def _worker_config(
    cfg: PretrainConfig,
    ds: ImageDataset,
    data: DataPlan | ResidentPlan,
    recipe: TwoViewRecipe,
    size: int,
    pair_use: str,
    schedule: Schedule,
) -> WorkerConfig:
    """The run as every rank reads it: settings resolved, data planned, monitor sampled."""
    optim = cfg.optim_recipe()
    return WorkerConfig(
        method=cfg.method,
        backbone=cfg.backbone,
        cifar_stem=cfg.cifar_stem,
        hparams=schedule.hparams,
        image_size=size,
        recipe=recipe,
        seed=cfg.seed,
        sync_bn=cfg.sync_bn,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        amp=cfg.amp,
        pair_use=pair_use,
        optim=optim,
        lr=optim.peak_lr(cfg.batch_size),
        warmup_steps=schedule.warmup_steps,
        reference_steps_per_epoch=schedule.reference_steps_per_epoch,
        report_every_steps=cfg.report_every_steps,
        data=data,
        workers=cfg.workers,
        preflight=cfg.preflight,
        preflight_limit_gb=cfg.preflight_limit_gb,
        dataset=cfg.dataset,
        split=cfg.split,
        out=cfg.out,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        monitor=_monitor(ds, cfg, size),
        knn_every=cfg.knn_every,
        knn_k=cfg.knn_k,
        num_classes=max(1, len(ds.classes)),
    )


def _fit(
    cfg: PretrainConfig,
    run: _Run,
    callbacks: list[Any] | None,
    resumed: tuple[int, str] | None,
) -> tuple[Result, float]:
    """Train on Ray Train: DDP over ``workers``, restarts on a lost worker (``FailureConfig``),
    and the run folder at ``OUT/checkpoints`` (`sepp_ray.train.ray_checkpoints`), where Ray
    keeps the best checkpoints by the kNN monitor and from which it restores a run whose driver
    died. Returns Ray's result and the wall time."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sepp_ray.train.progress import ProgressBar
    from sepp_ray.train.ray_checkpoints import checkpoint_config, run_storage
    from sepp_ray.train.worker import train_loop

    worker = run.worker
    run_config = RunConfig(
        **run_storage(cfg.out),
        checkpoint_config=checkpoint_config(cfg.keep_checkpoints, worker.monitor is not None),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        callbacks=callbacks,
    )
    trainer = TorchTrainer(
        partial(train_loop, worker),  # the one typed object every rank reads
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=run.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=run_config,
    )
    t0 = time.perf_counter()
    with ProgressBar(cfg.out, worker.data.epochs, resumed[0] if resumed else 0):
        result = trainer.fit()
    return result, time.perf_counter() - t0


def _final_checkpoint(cfg: PretrainConfig, loc: Location, result: Result, epochs: int) -> str:
    """The run's final checkpoint; a SeppError for a run that failed, whose batch did not fit
    the GPUs, whose loss diverged, or that ended without it."""
    from sepp_ray.train.preflight import check_preflight
    from sepp_ray.train.remine import check_round_failed
    from sepp_ray.train.state import CKPT_DIR, DIVERGED, latest_checkpoint

    if result.error is not None:
        raise SeppError(f"training failed: {result.error}")
    check_preflight(loc)  # a local batch too big for the GPUs: the error rank 0 left
    check_round_failed(cfg.out)  # a re-mining round that could not be mined
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
    return final[1]


def _manifest(
    cfg: PretrainConfig,
    run: _Run,
    final: str,
    resumed: tuple[int, str] | None,
    wall: float,
    result: Result,
) -> dict[str, Any]:
    """The run's manifest: its plan, where it (re)started, and what it measured."""
    from sepp_ray.train.ray_checkpoints import best_uri

    w, data = run.worker, run.worker.data
    ckpt = read_manifest(final)
    history, starts, nodes = _history(final)
    return {
        "kind": "pretrain",
        "final_checkpoint": final,
        # of the checkpoints Ray kept, the best by the kNN monitor on the validation split
        "best_checkpoint": best_uri(result, cfg.out),
        "epochs": cfg.epochs,
        "epochs_run": data.epochs,
        "budget_steps": cfg.budget_steps,
        "total_steps": data.total_steps,
        "hparams": w.hparams,
        "decode": run.spec.mode if data.choice.mode == "stream" else "resident",
        "data_plane": data.choice.to_dict(),
        "resumed_from_epoch": resumed[0] if resumed else 0,
        "items": run.counts,
        "multi_positive": w.pair_use != "none",
        "steps_per_epoch": data.steps_per_epoch,
        "schedule": run.schedule.to_dict(),
        "pair_share_warning": run.crowded,
        "lr": w.lr,
        "optim": w.optim.to_dict(),
        "image_size": w.image_size,
        "use_gpu": run.use_gpu,
        "workers": cfg.workers,
        "worker_nodes": nodes,
        "wall_seconds": round(wall, 2),
        "final_metrics": ckpt.get("metrics"),
        "history": history,
        # over the whole run and all ranks: pair items trained on, mined pairs the loss used
        # (attracted or cancelled), same-image negatives (0: the image mask held)
        **{
            k: int(sum(h.get(k, 0) for h in history))
            for k in ("pair_items", "pairs_used", "same_image_negatives")
        },
        "loop_starts_at_epoch": starts,
        **_rounds_of(w, data.epochs),
        "config": asdict(cfg),
        "pairs_per_s_mean": float(np.mean([h.get("pairs_per_s", 0) for h in history]))
        if history
        else math.nan,
    }


def _rounds_of(w: WorkerConfig, epochs: int) -> dict[str, Any]:
    """The manifest's re-mining: its settings and every round's pairs, count and precision."""
    from sepp_ray.train.remine import mining_dict, summarise_rounds

    if w.remine is None:
        return {}
    return {"remine": mining_dict(w.remine), "rounds": summarise_rounds(w.remine, w.out, epochs)}


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
