"""`--dry-run` of `sepp pipeline` and `sepp pretrain`: the plan, its resources and its cost,
before anything starts.

A run of the papers' experiments holds a cluster for hours to weeks; its user should know
beforehand what each stage takes and what the whole costs. The plan is a pure function of the
config, the hardware and the data's size (`plan_pipeline`, `plan_pretrain`); the figures it
uses come from `sepp_ray.flow.throughput`, each with its source, and are printed with the plan.
Nothing here starts Ray or reads remote data (`sepp_ray.flow.datasizes`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sepp_ray.console import say
from sepp_ray.errors import SeppError
from sepp_ray.flow import throughput as tp
from sepp_ray.flow.datasizes import DataSize

if TYPE_CHECKING:
    from sepp_ray.data.ingest import ImageOptions
    from sepp_ray.flow.pipeline import PipelineConfig
    from sepp_ray.mining.mine import MineConfig
    from sepp_ray.train.config import PretrainConfig

HARDWARE = re.compile(r"^(?P<kind>[a-z][a-z0-9]*?)(?:x(?P<n>\d+))?$")


@dataclass(frozen=True)
class Hardware:
    """``count`` GPUs of one kind, with their nodes' vCPUs."""

    kind: str
    gpu: tp.Gpu
    count: int
    assumed: bool = False  # not named by --hardware: H100s, one a worker

    @property
    def vcpus(self) -> int:
        return self.count * self.gpu.vcpus_per_gpu

    @property
    def speed(self) -> float:
        return self.gpu.speed.value

    def describe(self) -> str:
        text = (
            f"{self.kind}x{self.count}: {self.count} x {self.gpu.name}, {self.vcpus} vCPUs "
            f"(nodes like {self.gpu.node})"
        )
        return text + (" (assumed: --hardware names yours)" if self.assumed else "")


def parse_hardware(spec: str | None, default_count: int) -> Hardware:
    """``h100x8`` (8 H100s), or ``h100`` (as many as the run's workers)."""
    m = HARDWARE.match((spec or "h100").strip().lower())
    if not m or (m["n"] is not None and int(m["n"]) < 1):
        raise SeppError(
            f"--hardware {spec!r}: give a GPU kind and count, e.g. h100x8 (kinds: "
            f"{', '.join(tp.GPUS)})"
        )
    count = int(m["n"]) if m["n"] else max(1, default_count)
    return Hardware(m["kind"], tp.gpu(m["kind"]), count, assumed=spec is None)


@dataclass(frozen=True)
class Row:
    """One stage of the plan."""

    stage: str
    resources: str
    work: str
    wall_s: float
    gpu_hours: float
    figures: tuple[tp.Figure, ...] = ()


@dataclass
class Plan:
    """The stages in order, what they run on, and the notes that qualify the estimate."""

    command: str
    hardware: Hardware
    data: DataSize
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return sum(r.wall_s for r in self.rows)

    @property
    def gpu_hours(self) -> float:
        return sum(r.gpu_hours for r in self.rows)


# ---- the stages ------------------------------------------------------------------------------


def train_side(p: PretrainConfig, data: DataSize) -> int:
    side = p.image_size or data.side
    if not side:
        raise SeppError(
            f"{data.name} has images of several sizes: set pretrain.image_size (the training "
            "resolution, e.g. 224) so the plan can size the steps"
        )
    return int(side)


def steps_of(n_items: int, batch: int, epochs: int) -> int:
    """Optimizer steps of ``epochs`` over ``n_items`` (the driver drops the last partial batch)."""
    if n_items < batch:
        raise SeppError(f"batch_size {batch} exceeds the {n_items:,} training items: lower it")
    return (n_items // batch) * epochs


def _monitor_s(p: PretrainConfig, data: DataSize, side: int, hw: Hardware, epochs: int) -> float:
    """The kNN monitor's embedding passes (rank 0 embeds while the others wait)."""
    if not p.knn_monitor or p.monitor_split not in data.splits:
        return 0.0
    images = min(p.knn_max_train, data.split(p.split)) + min(
        p.knn_max_test, data.splits[p.monitor_split]
    )
    rate = tp.embed_rate(p.backbone, p.cifar_stem, side).value * hw.speed
    return math.ceil(epochs / p.knn_every) * images / rate


def _rounds_s(
    p: PretrainConfig, data: DataSize, hw: Hardware, side: int, epochs: int, every: int | None
) -> tuple[int, float]:
    """Re-mining rounds of a run (``every`` epochs apart) and their time: the training workers
    embed the split and search the anchors (the first pairs' K, taken as the pipeline's)."""
    from sepp_ray.mining.anchors import resolve_k
    from sepp_ray.mining.mine import MineConfig

    rounds = (epochs - 1) // every if every else 0
    if not rounds:
        return 0, 0.0
    n = data.split(p.split)
    embed = tp.embed_rate(p.backbone, p.cifar_stem, side).value * hw.speed * p.workers
    _, dim = tp.forward_flops(p.backbone, p.cifar_stem, side)
    search = tp.search_seconds(resolve_k(MineConfig().k, n), n, dim) / (hw.speed * p.workers)
    return rounds, rounds * (n / embed + search)


def train_row(
    name: str,
    p: PretrainConfig,
    data: DataSize,
    hw: Hardware,
    steps: int,
    remine_every: int | None = None,
) -> Row:
    """A pretraining run of ``steps`` optimizer steps on ``p.workers`` GPUs (and its re-mining
    rounds every ``remine_every`` epochs)."""
    if p.workers > hw.count:
        raise SeppError(
            f"pretrain.workers={p.workers} needs {p.workers} GPUs and --hardware names "
            f"{hw.count}: name {hw.kind}x{p.workers}, or lower workers"
        )
    side = train_side(p, data)
    rate, cost = tp.train_rate(p.method, p.backbone, p.cifar_stem, side)
    eff = tp.DDP_EFFICIENCY.value if p.workers > 1 else 1.0
    pairs_per_s = rate.value * hw.speed / cost.value * p.workers * eff
    per_epoch = max(1, data.split(p.split) // p.batch_size)
    epochs = max(1, math.ceil(steps / per_epoch))
    wall = tp.START_UP.value + steps * p.batch_size / pairs_per_s
    wall += _monitor_s(p, data, side, hw, epochs)
    rounds, rounds_s = _rounds_s(p, data, hw, side, epochs, remine_every)
    wall += rounds_s
    figures = (rate, cost, hw.gpu.speed, tp.START_UP) + ((tp.DDP_EFFICIENCY,) if eff < 1 else ())
    if rounds:
        figures += (tp.embed_rate(p.backbone, p.cifar_stem, side), tp.SEARCH)
    return Row(
        name,
        f"{_n(p.workers, 'GPU worker')} x {_n(p.cpus_per_worker, 'CPU')}",
        f"{steps:,} steps x {p.batch_size:,} ({epochs} epochs of {data.split(p.split):,}; "
        f"{p.method} {p.backbone} {side} px"
        + (f"; {_n(rounds, 're-mining round')})" if rounds else ")"),
        wall,
        wall * p.workers / 3600,
        figures,
    )


def ingest_row(data: DataSize, images: ImageOptions, hw: Hardware) -> Row:
    """Ingest on the cluster's CPUs: no GPU is held (the nodes may be up, though)."""
    if data.kind == "arrays":
        kind = "arrays"
    else:
        kind = "reencode" if images.resize or images.encoding == "jpeg" else "keep"
    rate = tp.INGEST[kind]
    total = sum(data.splits.values())
    wall = tp.START_UP.value + total / (rate.value * hw.vcpus)
    return Row(
        "data (ingest)", f"{hw.vcpus} vCPUs", f"{total:,} images", wall, 0.0, (rate, tp.START_UP)
    )


def mine_row(
    p: PretrainConfig, mining: MineConfig, data: DataSize, hw: Hardware, name: str = "pairs"
) -> Row:
    """Embed the training split with the sampler on every GPU, then search the anchors."""
    from sepp_ray.mining.anchors import resolve_k

    side = train_side(p, data)
    n = data.split(p.split)
    embed = tp.embed_rate(p.backbone, p.cifar_stem, side)
    _, dim = tp.forward_flops(p.backbone, p.cifar_stem, side)
    anchors = resolve_k(mining.k, n)
    embed_s = n / (embed.value * hw.speed * hw.count)
    search_s = tp.search_seconds(anchors, n, dim) / (hw.speed * hw.count)
    wall = tp.START_UP.value + embed_s + search_s
    return Row(
        name,
        f"{_n(hw.count, 'GPU')} (embedding, search)",
        f"embed {n:,} images, search {anchors:,} anchors x {n:,} keys x {dim}-d",
        wall,
        wall * hw.count / 3600,
        (embed, tp.SEARCH, hw.gpu.speed, tp.START_UP),
    )


def eval_row(c: PipelineConfig, data: DataSize, hw: Hardware, checkpoints: int) -> Row:
    """Frozen features of train and test per checkpoint on every GPU, then the protocols."""
    from sepp_ray.eval.linear import LinearProbeConfig

    p = c.pretrain
    side = train_side(p, data)
    train, test = data.splits.get("train", 0), data.splits.get("test", 0)
    embed = tp.embed_rate(p.backbone, p.cifar_stem, side)
    feat_s = checkpoints * (train + test) / (embed.value * hw.speed * hw.count)
    linear_s = 0.0
    if "linear" in c.protocols:
        epochs = LinearProbeConfig().epochs
        linear_s = checkpoints * train * epochs / (tp.LINEAR_PROBE.value * hw.speed)
    wall = tp.START_UP.value + feat_s + linear_s
    return Row(
        "eval",
        f"{_n(hw.count, 'GPU')} (features), 1 GPU a protocol",
        f"{checkpoints} checkpoints x {train + test:,} images; {', '.join(c.protocols)}",
        wall,
        ((tp.START_UP.value + feat_s) * hw.count + linear_s) / 3600,
        (embed, tp.LINEAR_PROBE, tp.START_UP),
    )


# ---- whole plans -----------------------------------------------------------------------------


def _seed_rows(c: PipelineConfig, data: DataSize, hw: Hardware, i: int, mine: bool) -> list[Row]:
    """Seed ``i``'s runs in the pipeline's order: with ``mine``, the sampler first (a bootstrap
    run, unless a checkpoint is given or the bootstrap is this seed's plain run) and its pairs,
    then every arm, all at the plain run's optimizer steps."""
    p = c.pretrain
    seed = p.seed + i
    plain = steps_of(data.split(p.split), p.batch_size, p.epochs)
    arms = [
        train_row(f"{arm}-seed{seed}", p, data, hw, plain, _remine_every(c, arm)) for arm in c.arms
    ]
    if not mine:
        return arms
    rows: list[Row] = []
    if c.bootstrap_epochs == p.epochs and not c.sampler_checkpoint:  # one stage, trained once
        first = arms.pop(c.arms.index("plain"))
        rows.append(replace(first, stage=f"{first.stage} (= bootstrap)"))
    elif not c.sampler_checkpoint:
        boot = steps_of(data.split(p.split), p.batch_size, c.bootstrap_epochs)
        rows.append(train_row(f"bootstrap-seed{seed}", p, data, hw, boot))
    return [*rows, mine_row(p, c.mining, data, hw, f"pairs-seed{seed}"), *arms]


def _remine_every(c: PipelineConfig, arm: str) -> int | None:
    from sepp_ray.flow.pipeline import arm_pairs

    return arm_pairs(arm, "pairs", c.curated, c).remine_every if arm == "sp-remine" else None


def plan_pipeline(c: PipelineConfig, data: DataSize, hw: Hardware) -> Plan:
    """Every stage `sepp pipeline` runs with ``c`` on ``hw``, in order, with its estimate."""
    from sepp_ray.flow.pipeline import MINED

    plan = Plan("pipeline", hw, data)
    if not data.ingested:
        plan.rows.append(ingest_row(data, c.images, hw))
    mined = any(a in MINED for a in c.arms)
    for i in range(c.seeds):
        plan.rows += _seed_rows(c, data, hw, i, mined and (i == 0 or c.sampler_per_seed))
    plan.rows.append(eval_row(c, data, hw, len(c.arms) * c.seeds))
    plan.notes += _pipeline_notes(c, mined)
    return plan


def _pipeline_notes(c: PipelineConfig, mined: bool) -> list[str]:
    p = c.pretrain
    notes = []
    if mined and c.sampler_checkpoint:
        notes.append(f"sampler: the given checkpoint, embedding costed as a {p.backbone}")
    elif mined and c.bootstrap_epochs == p.epochs:
        notes.append(
            "sampler: the plain run of each sampler seed is the bootstrap (same config: one "
            "run, trained once, then mined)"
        )
    if c.equal_compute:
        notes.append(
            "equal compute: every arm takes the plain run's optimizer steps, whatever its items"
        )
    else:
        notes.append("equal_compute=false: pair arms take more steps than planned here")
    return notes + batch_note(p)


# the local batch of DESIGN.md's measured training ceilings (256; 512 for the 32 px ResNet-18)
MEASURED_LOCAL_BATCH = 256


def batch_note(p: PretrainConfig) -> list[str]:
    """A local batch below the measured one runs below the measured pairs/s."""
    local = p.batch_size // p.workers
    if local >= MEASURED_LOCAL_BATCH:
        return []
    return [
        f"local batch {local} (batch_size {p.batch_size} over {p.workers} workers) is below "
        f"the {MEASURED_LOCAL_BATCH}+ of the measured step figures: expect slower steps"
    ]


def plan_pretrain(p: PretrainConfig, data: DataSize, hw: Hardware, pairs: int | None) -> Plan:
    """`sepp pretrain` with ``p``: one run; ``pairs``: the pair table's size when known."""
    from sepp_ray.train.budget import ITEM_MODES

    plan = Plan("pretrain", hw, data)
    items = data.split(p.split)
    if p.pairs.pairs and p.pairs.mode in ITEM_MODES:
        if pairs is None:
            plan.notes.append("pair items not counted: the pairs' manifest is not local")
        items += pairs or 0
    steps = p.budget_steps or steps_of(items, p.batch_size, p.epochs)
    plan.rows.append(train_row("pretrain", p, data, hw, steps, p.pairs.remine_every))
    plan.notes += batch_note(p)
    return plan


def add_feed_note(plan: Plan, p: PretrainConfig) -> None:
    """Warn when the CPUs may not decode as fast as the GPUs train (streamed JPEGs)."""
    if plan.data.side is not None or p.decode_on != "cpu":
        return
    rows = [r for r in plan.rows if r.figures and r.figures[0].unit == "pairs/s"]
    if not rows:
        return
    side = train_side(p, plan.data)
    rate, cost = tp.train_rate(p.method, p.backbone, p.cifar_stem, side)
    need = rate.value * plan.hardware.speed / cost.value * p.workers
    spare = max(1.0, plan.hardware.vcpus - p.workers * p.cpus_per_worker)
    have = spare * tp.CPU_DECODE.value
    if need > have:
        plan.notes.append(
            f"feed: the GPUs take ~{need:,.0f} images/s and {spare:g} spare vCPUs decode "
            f"~{have:,.0f} ({tp.CPU_DECODE.cite()}): set decode_on=gpu or fewer cpus_per_worker"
        )


# ---- output ----------------------------------------------------------------------------------


def _n(count: float, noun: str) -> str:
    return f"{count:g} {noun}" + ("" if count == 1 else "s")


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_plan(plan: Plan) -> str:
    """The plan as a Markdown table, its totals, the figures behind it and its notes."""
    d = plan.data
    sizes = ", ".join(f"{s} {n:,}" for s, n in d.splits.items())
    side = f"{d.side} px" if d.side else "sizes vary"
    cited: list[tp.Figure] = []
    lines = [
        f"sepp {plan.command} --dry-run: the plan; nothing started, no data read",
        f"hardware: {plan.hardware.describe()}",
        f"data: {d.name}: {sizes}; {side} (sizes from {d.source})",
        "",
        "| stage | resources | work | wall time | GPU-hours | figures |",
        "|---|---|---|---|---|---|",
    ]
    for r in plan.rows:
        refs = []
        for f in (f for f in r.figures if not f.identity):
            if f not in cited:
                cited.append(f)
            refs.append(str(cited.index(f) + 1))
        lines.append(
            f"| {r.stage} | {r.resources} | {r.work} | {duration(r.wall_s)} | "
            f"{r.gpu_hours:,.1f} | {','.join(refs)} |"
        )
    lines.append(f"| total | | | {duration(plan.wall_s)} | {plan.gpu_hours:,.1f} | |")
    lines += ["", "figures:"] + [f"  [{i}] {f.cite()}" for i, f in enumerate(cited, 1)]
    lines += ["", "notes:"] + [f"  - {n}" for n in plan.notes + _standing_notes(plan)]
    return "\n".join(lines)


def _standing_notes(plan: Plan) -> list[str]:
    ingest = any(r.stage.startswith("data") for r in plan.rows)
    return [
        "GPU-hours: the GPUs a stage holds x its wall time"
        + (
            "; ingest runs on CPUs (0 GPU-hours), though on cluster.yaml those CPUs are the "
            "GPU nodes'"
            if ingest
            else ""
        ),
        "an estimate is a stated guess until measured (sepp_ray/flow/throughput.py): a real "
        "run's manifest (pairs_per_s_mean) is the figure to trust",
    ]


# ---- the commands' hook ----------------------------------------------------------------------


def dry_run(command: str, config: Any, hardware: str | None, data_size: str | None) -> int:
    """Validate ``config`` as the command would, then print its plan; start nothing."""
    from sepp_ray.data.ingest import ImageOptions
    from sepp_ray.flow import datasizes as ds

    if command == "pipeline":
        check_pipeline(config)
        given = ds.from_option(data_size) if data_size else None
        size = given or ds.source_size(config.source, config.format, config.source_options)
        if size is None:
            raise ds.need_size(config.source)
        size = ds.carve_val(size, config.images.val_fraction)
        hw = parse_hardware(hardware, config.pretrain.workers)
        plan = plan_pipeline(config, size, hw)
        add_feed_note(plan, config.pretrain)
    elif command == "pretrain":
        config.validate()
        size = ds.from_option(data_size) if data_size else ds.ingested_size(config.dataset)
        if size is None:
            raise ds.need_size(config.dataset)
        size = ds.carve_val(size, ImageOptions().val_fraction)  # a named dataset, as ingested
        hw = parse_hardware(hardware, config.workers)
        plan = plan_pretrain(config, size, hw, _local_pairs(config.pairs.pairs))
        add_feed_note(plan, config)
    else:
        raise SeppError(f"--dry-run is offered by pipeline and pretrain, not {command}")
    say(format_plan(plan))
    return 0


def check_pipeline(c: PipelineConfig) -> None:
    """The checks `run_pipeline` makes before its first stage."""
    from sepp_ray.eval.command import EvalConfig
    from sepp_ray.flow.pipeline import check_arms

    c.mining.validate()
    check_arms(c)
    EvalConfig(protocols=list(c.protocols), k=c.pretrain.knn_k).validate_settings()


def _local_pairs(uri: str | None) -> int | None:
    """A local pairs table's size from its manifest; None when remote or absent."""
    import os

    from sepp_ray.storage import MANIFEST, read_manifest

    if not uri or "://" in uri or not os.path.isfile(os.path.join(uri, MANIFEST)):
        return None
    return int(read_manifest(uri).get("num_pairs", 0))
