"""How `sepp pretrain` plans its data, before any worker starts: which data plane (resident or
streaming, by the split's decoded size), each plane's plan (the split decoded once in tasks, or
the pair-item table and the row groups to stream), the steps an epoch takes, the CPUs decoding
needs, and the run's re-mining rounds. The driver (`sepp_ray.train.driver`) calls these in turn.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from sepp_ray.errors import SeppError

if TYPE_CHECKING:
    from sepp_ray.data.dataset import ImageDataset
    from sepp_ray.train.config import PretrainConfig
    from sepp_ray.train.dataplane import DataPlan
    from sepp_ray.train.feed import DecodeSpec
    from sepp_ray.train.items import ItemPlan
    from sepp_ray.train.remine import RemineSpec
    from sepp_ray.train.resident import PlaneChoice, ResidentPlan

log = logging.getLogger(__name__)


def remining(
    cfg: PretrainConfig, ds: ImageDataset, choice: PlaneChoice, epochs: int
) -> RemineSpec | None:
    """The run's re-mining rounds (None: mined once); on the streaming plane with the split's
    row groups, which the ranks read to embed it."""
    from sepp_ray.train.census import census
    from sepp_ray.train.dataplane import image_files
    from sepp_ray.train.remine import plan_remining

    where = (cfg.dataset, cfg.split)
    spec = plan_remining(cfg.pairs, cfg.method, where, ds.classes, epochs, cfg.seed)
    if spec is None or choice.mode == "resident":
        return spec
    chunks = census(image_files(ds), "images", cfg.split, None)
    return replace(spec, image_chunks=chunks, max_item_table_gb=cfg.max_item_table_gb)


def epoch_steps(cfg: PretrainConfig, n_items: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run over ``n_items`` training items."""
    if n_items < cfg.batch_size:
        raise SeppError(
            f"batch_size {cfg.batch_size} exceeds the {n_items} training items: lower it"
        )
    steps_per_epoch = n_items // cfg.batch_size
    return steps_per_epoch, cfg.budget_steps or steps_per_epoch * cfg.epochs


def choose_plane(cfg: PretrainConfig, ds: ImageDataset, use_gpu: bool) -> PlaneChoice:
    """Resident or streaming (`sepp_ray.train.resident.choose_plane`), by the split's decoded
    size against what one rank may hold: ``resident_max_gb`` of device memory on GPUs (a rank
    still falls back to pinned host memory when its device has less free), on CPUs also at most
    a quarter of the smallest node's memory shared by the workers."""
    import ray

    from sepp_ray.train.resident import HOST_SHARE, choose_plane

    budget = int(cfg.resident_max_gb * 2**30)
    if not use_gpu:
        nodes = [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")]
        host = min((m for m in nodes if m > 0), default=0)
        budget = min(budget, int(HOST_SHARE * host / cfg.workers))
    choice = choose_plane(cfg.data_plane, ds.manifest, cfg.split, cfg.decode_on, budget)
    log.info("data plane: %s (%s)", choice.mode, choice.reason)
    return choice


def stream_plan(
    cfg: PretrainConfig, ds: ImageDataset, plan: ItemPlan, spec: DecodeSpec, choice: PlaneChoice
) -> DataPlan:
    """The streaming plan: pair items written once into the run's item table, row groups
    counted in tasks; each rank then reads and decodes its rows every epoch."""
    import ray

    from sepp_ray.train.dataplane import DataPlan, item_table, training_chunks
    from sepp_ray.train.feed import FeedConfig
    from sepp_ray.train.plan import total_rows

    item_files = item_table(plan, ds, cfg.split, cfg.out, cfg.seed, cfg.max_item_table_gb)
    exclude = ray.put(plan.exclude) if len(plan.exclude) else None
    chunks = training_chunks(ds, plan, item_files, cfg.split, exclude)
    steps_per_epoch, total_steps = epoch_steps(cfg, total_rows(chunks))
    return DataPlan(
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
        choice=choice,
    )


def resident_plan(
    cfg: PretrainConfig, ds: ImageDataset, plan: ItemPlan, spec: DecodeSpec, choice: PlaneChoice
) -> ResidentPlan:
    """The resident plan: the split decoded once in tasks (the driver keeps their ObjectRefs),
    pair items as ids that each rank turns into row indices; no item table is written."""
    from sepp_ray.train.census import census
    from sepp_ray.train.dataplane import image_files
    from sepp_ray.train.resident import (
        ResidentItems,
        ResidentPlan,
        decode_split,
        index_items,
        split_ids,
        stored_shape,
    )

    shape = stored_shape(ds.manifest)
    assert shape is not None  # choose_plane made sure
    chunks = census(image_files(ds), "images", cfg.split, None)
    images = int(sum(c.rows for c in chunks))
    items = ResidentItems.of(plan, cfg.pairs.max_positives)
    steps_per_epoch, total_steps = epoch_steps(cfg, items.count(images))
    id_refs, refs = decode_split(chunks, cfg.split, shape, cfg.decode_cpus)
    index_items(items, split_ids(id_refs))  # pairs naming images outside the split: refused here
    return ResidentPlan(
        refs=refs,
        shape=shape,
        images=images,
        items=items,
        global_batch=cfg.batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        seed=cfg.seed,
        choice=choice,
    )


def check_decode_cpus(cfg: PretrainConfig) -> None:
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
