"""What a sweep searches and how one grid point becomes a trial: the search space, the sweep's
config, and the typed context every trial is built from (shared by the driver, the trials and
the report, so none of them imports another).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sepp_ray.config import opt
from sepp_ray.data.ingest import ImageOptions
from sepp_ray.data.sources import SourceOptions
from sepp_ray.flow.stages import FlowConfig, pairs_identity, stage_hash
from sepp_ray.mining.mine import MineConfig
from sepp_ray.train.budget import epochs_for, planned_items
from sepp_ray.train.driver import PretrainConfig
from sepp_ray.train.items import PairsConfig

MINING_KEYS = ("lo", "hi", "k")


@dataclass
class SearchSpace:
    """Values to grid-search; an empty list keeps the base config's value."""

    lo: list[float] = opt([], "lower cosine thresholds (mining.lo)")
    hi: list[float] = opt([], "upper cosine thresholds (mining.hi)")
    k: list[float] = opt([], "anchors: fractions or counts (mining.k)")
    method: list[str] = opt([], "SSL methods (pretrain.method)")
    backbone: list[str] = opt([], "backbones (pretrain.backbone)")
    base_lr: list[float] = opt([], "learning rates at batch 256 (pretrain.base_lr)")
    temperature: list[float] = opt([], "loss temperatures (pretrain.hparams.temperature)")


@dataclass
class SweepConfig(FlowConfig):
    out: str = opt("runs/sweep", "stages, trials, Tune state and the summary (local or s3://)")
    space: SearchSpace = field(default_factory=SearchSpace)
    pairs_mode: str = opt(
        "dataset", "how pairs enter training: dataset, multi_positive, both, cancel"
    )
    num_samples: int = opt(1, "trials per grid point, seeded pretrain.seed, +1, ...")
    grace_period: int = opt(
        1, "ASHA: plain-run epochs (in optimizer steps) every trial runs before it may stop"
    )
    reduction_factor: float = opt(2.0, "ASHA: a rung keeps the best 1/reduction_factor")
    metric: str = opt(
        "knn_top1", "the per-epoch metric ASHA and the ranking read (knn_*: on the val split)"
    )
    mode: str = opt("max", "max or min: whether a larger metric is better")
    gpus_per_trial: int | None = opt(
        None,
        "GPUs (= training workers) per trial; default: pretrain.workers on a GPU cluster, else 0",
    )
    cpus_per_trial: float | None = opt(
        None,
        "CPUs one trial uses, for the concurrency on "
        "CPU clusters (default: workers x cpus_per_worker + 1)",
    )
    max_concurrent: int | None = opt(
        None, "trials at once (default: cluster GPUs // gpus_per_trial, or CPUs // cpus_per_trial)"
    )
    protocols: list[str] = opt(
        ["knn"],
        "evaluation protocols of every trial's last checkpoint ([]: none; the table then shows "
        "the kNN monitor's last value)",
    )
    images: ImageOptions = field(default_factory=ImageOptions)
    source_options: SourceOptions = field(default_factory=SourceOptions)


@dataclass(frozen=True)
class TrialContext:
    """What every trial shares, fixed before Tune starts: the base configs, the data and the
    mined pairs (one table per distinct sampler config, keyed by its config's hash)."""

    base: PretrainConfig
    mining: MineConfig
    pairs_mode: str
    metric: str = "knn_top1"
    out: str = ""
    data_uri: str = ""
    data_fp: str = ""
    pairs: dict[str, str] = field(default_factory=dict)
    num_pairs: dict[str, int] = field(default_factory=dict)  # pairs URI -> pairs in it
    budget: int | None = None  # the plain run's optimizer steps, every trial's (equal_compute)
    n_train: int = 0  # images in the training split


def axes(c: SweepConfig) -> dict[str, list[Any]]:
    """The searched keys and their values: the non-empty lists, plus seeds for num_samples."""
    out = {k: list(dict.fromkeys(v)) for k, v in asdict(c.space).items() if v}
    if c.num_samples > 1:
        out["seed"] = [c.pretrain.seed + i for i in range(c.num_samples)]
    return out


def grid(ax: dict[str, list[Any]], keys: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Every combination of the axes among ``keys`` ([{}] when none is searched)."""
    sel = {k: v for k, v in ax.items() if keys is None or k in keys}
    return [dict(zip(sel, vals, strict=True)) for vals in itertools.product(*sel.values())]


def mining_for(base: MineConfig, params: dict[str, Any]) -> MineConfig:
    return replace(base, **{k: params[k] for k in MINING_KEYS if k in params})


def trial_pretrain(ctx: TrialContext, params: dict[str, Any]) -> PretrainConfig:
    """The pretraining config of one trial (``out`` left empty; see ``trial_out``). It reports
    every plain-run epoch of optimizer steps, whatever its own epoch's length, so ASHA and the
    ranking compare trials at equal steps (``report_steps``)."""
    hparams = dict(ctx.base.hparams)
    if "temperature" in params:
        hparams["temperature"] = params["temperature"]
    pairs_key = stage_hash(asdict(mining_for(ctx.mining, params)))
    return replace(
        ctx.base,
        **{k: params[k] for k in ("method", "backbone", "base_lr", "seed") if k in params},
        hparams=hparams,
        dataset=ctx.data_uri,
        out="",
        overwrite=False,
        pairs=PairsConfig(pairs=ctx.pairs.get(pairs_key), mode=ctx.pairs_mode),
        budget_steps=ctx.budget,
        report_every_steps=report_steps(ctx),
    )


def report_steps(ctx: TrialContext) -> int:
    """Every trial's report interval: the plain run's epoch in optimizer steps (the training
    split's images // batch), the unit of ASHA's grace period."""
    return max(1, ctx.n_train // ctx.base.batch_size)


def trial_plan(ctx: TrialContext, cfg: PretrainConfig) -> dict[str, int]:
    """A trial's steps per epoch, optimizer steps and epochs, from the manifests: ASHA's
    clock, and what tells a finished trial from one ASHA stopped."""
    n_pairs = ctx.num_pairs.get(cfg.pairs.pairs or "", 0)
    items = planned_items(ctx.n_train, n_pairs, cfg.pairs.mode)
    spe = max(1, items // cfg.batch_size)
    total = cfg.budget_steps or spe * cfg.epochs
    return {"steps_per_epoch": spe, "total_steps": total, "epochs": epochs_for(total, spe)}


def trial_out(ctx: TrialContext, cfg: PretrainConfig) -> str:
    """OUT/trials/trial-<hash of data, config and pairs>: a fresh Tune run reuses it too."""
    payload = {
        "data": ctx.data_fp,
        "cfg": {k: v for k, v in asdict(cfg).items() if k not in ("out", "dataset")},
        "pairs_fp": pairs_identity(cfg.pairs.pairs),
    }
    return f"{ctx.out}/trials/trial-{stage_hash(payload)}"
