"""`sepp sweep`: Ray Tune over thresholds, K, method, backbone, learning rate and temperature.

The driver ingests (or reuses) the data, bootstraps (or takes) one sampler and mines the pairs
of every distinct (lo, hi, K) up front, each into ``OUT/pairs-<hash>``: trials that share a
sampler config share one mining, and no two trials race to write it. Tune then runs one trial
per grid point (x ``num_samples`` seeds); each trial launches a Ray Train pretraining run into
``OUT/trials/trial-<hash>`` whose metrics reach Tune through a Ray Train callback (see
``sepp_ray.tune.trial``) every plain-run epoch of optimizer steps, whatever the trial's own epoch
length, so ASHA (arXiv 1810.05934) stops weak trials on the kNN monitor at equal steps.
Selection reads validation only: the monitor queries ``pretrain.monitor_split`` ("val", carved
from train at ingest), never test, and ranks the trials; the test split is read once, by the
final evaluation. Every trial takes the plain run's optimizer steps (``equal_compute``), so
ASHA's time is optimizer steps: trials with more pair items run fewer, longer epochs.
Tune's state lives in ``OUT/tune/<experiment>`` (local or s3://): a rerun after an
interruption restores it (``Tuner.restore``) and each unfinished trial resumes from its own
newest checkpoint. Last, every trial's newest checkpoint is evaluated in one table and the
summary is written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from typing import Any

from sepp_ray.console import say
from sepp_ray.data.dataset import dataset_fingerprint
from sepp_ray.errors import SeppError
from sepp_ray.flow.stages import (
    Stages,
    embed_stage,
    eval_stage,
    mine_stage,
    prepare_data,
    sampler_checkpoint,
    stage_hash,
)
from sepp_ray.resources import ensure_gpus, gpu_wait
from sepp_ray.shared_storage import check_shared_storage
from sepp_ray.storage import (
    Location,
    absolute,
    begin_write,
    finish_write,
    ray_storage_filesystem,
    ray_storage_path,
)
from sepp_ray.train.budget import plain_steps, split_size
from sepp_ray.train.items import PairsConfig
from sepp_ray.tune.report import collect_rows, fill_eval, write_summary
from sepp_ray.tune.space import (
    MINING_KEYS,
    SweepConfig,
    TrialContext,
    axes,
    grid,
    mining_for,
    report_steps,
    trial_plan,
    trial_pretrain,
)

log = logging.getLogger(__name__)


def validate(c: SweepConfig) -> list[dict[str, Any]]:
    """Every trial's params, after checking each combination: bad input fails before Ray."""
    from sepp_ray.eval.protocols import PROTOCOLS
    from sepp_ray.methods.base import check_pair_use
    from sepp_ray.models.backbones import check_backbone

    PairsConfig(mode=c.pairs_mode).validate()
    if c.pretrain.monitor_split == "test" and c.metric.startswith("knn"):
        raise SeppError(
            "pretrain.monitor_split=test would select trials on the test split: keep it 'val' "
            "(carved from train at ingest, images.val_fraction)"
        )
    if c.mode not in ("max", "min"):
        raise SeppError(f"mode must be max or min, got {c.mode!r}")
    for name in ("num_samples", "grace_period"):
        if getattr(c, name) < 1:
            raise SeppError(f"{name} must be >= 1, got {getattr(c, name)}")
    if c.grace_period > c.pretrain.epochs:
        raise SeppError(f"grace_period {c.grace_period} exceeds pretrain.epochs: lower it")
    if c.reduction_factor <= 1:
        raise SeppError(f"reduction_factor must be > 1, got {c.reduction_factor}")
    if c.max_concurrent is not None and c.max_concurrent < 1:
        raise SeppError(f"max_concurrent must be >= 1, got {c.max_concurrent}")
    bad = sorted(set(c.protocols) - set(PROTOCOLS.names()))
    if bad:
        raise SeppError(f"unknown protocol(s) {bad}: choose among {PROTOCOLS.names()}, or none")
    ax = axes(c)
    for m in grid(ax, MINING_KEYS):
        mining_for(c.mining, m).validate()
    ctx = TrialContext(base=c.pretrain, mining=c.mining, pairs_mode="")
    trials = grid(ax)
    use = {"multi_positive": "attract", "both": "attract", "cancel": "cancel"}.get(c.pairs_mode)
    for params in trials:
        cfg = trial_pretrain(ctx, params)
        if use:  # pairs in the loss: the method must honour them (dataset mode: every method)
            check_pair_use(cfg.method, use)
        replace(cfg, pairs=c.pretrain.pairs).validate_settings()
        check_backbone(cfg.backbone, cfg.cifar_stem)
    return trials


def _check_monitor(c: SweepConfig, data: dict[str, Any]) -> None:
    """ASHA on a kNN metric needs the monitor, which needs labels in the training split and
    in the validation split it queries."""
    if not c.metric.startswith("knn"):
        return
    splits = data["splits"]
    needed = (c.pretrain.split, c.pretrain.monitor_split)
    labeled = all(splits.get(s, {}).get("labeled", 0) > 0 for s in needed)
    if not (c.pretrain.knn_monitor and labeled):
        raise SeppError(
            f"metric {c.metric} comes from the kNN monitor, which needs pretrain.knn_monitor=true "
            f"and labeled {needed[0]!r} and {needed[1]!r} splits (ingest carves 'val' from "
            "train: images.val_fraction > 0); or set metric=loss mode=min"
        )
    if c.pretrain.knn_every > c.grace_period:
        log.warning(
            "pretrain.knn_every=%d > grace_period=%d: ASHA only decides at reports (one per "
            "plain-run epoch of steps) with a kNN monitor result",
            c.pretrain.knn_every,
            c.grace_period,
        )


def _resources(c: SweepConfig) -> tuple[int, bool, int, float]:
    """(workers per trial, use_gpu, trials at once, CPUs per trial) from the cluster's shape."""
    import ray

    from sepp_ray.ray_utils import init_ray

    init_ray()
    check_shared_storage({"out": c.out, "sampler_checkpoint": c.sampler_checkpoint})
    wait = gpu_wait(c.pretrain.gpu_wait_s)
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    on_gpus = bool(gpus) or wait > 0  # told to wait: GPU trials even on a cluster at zero GPUs
    per = c.pretrain.workers if on_gpus else 0
    if c.gpus_per_trial is not None:
        per = c.gpus_per_trial
    if per:
        gpus = ensure_gpus(
            per * (c.max_concurrent or 1),
            wait,
            what="GPUs for the trials (gpus_per_trial x max_concurrent)",
            fix="lower gpus_per_trial or max_concurrent",
            cpus_per_gpu=c.pretrain.cpus_per_worker,
        )
    workers = per or c.pretrain.workers
    cpus_per = c.cpus_per_trial or workers * c.pretrain.cpus_per_worker + 1
    auto = gpus // per if per else int(cpus // cpus_per)
    return workers, bool(per), c.max_concurrent or max(1, auto), cpus_per


def _dirname(trial: Any) -> str:
    return str(trial.trial_id)


def _tuner(
    c: SweepConfig,
    trainable: Any,
    ax: dict[str, list[Any]],
    name: str,
    conc: int,
    clock: tuple[int, int],
) -> tuple[Any, bool]:
    """The sweep's Tuner: restored when an interrupted run of the same sweep is on storage.
    ``clock``: (max_t, grace period) in optimizer steps."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    tune_uri = f"{c.out}/tune"
    fs = ray_storage_filesystem(tune_uri)
    path = f"{ray_storage_path(tune_uri)}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"[sweep] restoring {tune_uri}/{name}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
        return tuner, True
    scheduler = ASHAScheduler(
        # optimizer steps, the compute every trial shares (a trial with more pair items has
        # longer epochs); not Tune's iteration count, which restarts with a restored trial
        time_attr="step",
        max_t=clock[0],
        grace_period=clock[1],
        reduction_factor=c.reduction_factor,
    )
    tuner = tune.Tuner(
        trainable,
        param_space={k: tune.grid_search(v) for k, v in ax.items()},
        tune_config=tune.TuneConfig(
            metric=c.metric,
            mode=c.mode,
            scheduler=scheduler,
            max_concurrent_trials=conc,
            trial_dirname_creator=_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=ray_storage_path(tune_uri),
            storage_filesystem=fs,
            # a trial's Tune checkpoints name its run's checkpoints (`sepp_ray.tune.trial`),
            # taken when the run reports one, ranked by the sweep's metric
            checkpoint_config=tune.CheckpointConfig(
                checkpoint_at_end=False,
                checkpoint_score_attribute=c.metric,
                checkpoint_score_order=c.mode,
            ),
        ),
    )
    return tuner, False


def run_sweep(c: SweepConfig) -> dict[str, Any]:
    """Run (or restore and finish) the sweep; returns the summary's URI and one row per trial."""
    from ray import tune

    from sepp_ray.tune.trial import SweepTrial  # imports Ray Tune: only when a sweep runs

    c, conc, cpus_per = _resolve(c)
    # OUT holds the stages too: keep them all, only the manifest goes until the summary is done
    loc = begin_write(c.out, overwrite=True, keep=tuple(Location(c.out).listdir()))
    st = Stages(c.out)
    ctx, data, mined = _prepare(c, st)
    clock, name = _asha_clock(c, ctx), _experiment_name(c, ctx)
    # the trial itself holds almost nothing: its Ray Train workers reserve their own resources
    trainable = tune.with_resources(tune.with_parameters(SweepTrial, ctx=ctx), {"cpu": 0.01})
    tuner, restored = _tuner(c, trainable, axes(c), name, conc, clock)
    rows = collect_rows(tuner.fit(), ctx, mined)
    if rows and all(r["status"] == "error" for r in rows):
        raise SeppError(f"every trial failed; the first error: {rows[0]['error']}")
    ckpts = [r["checkpoint"] for r in rows if r["checkpoint"]] if c.protocols else []
    _, heads = eval_stage(st, ckpts, ctx.data_uri, data, c.protocols, c.pretrain.knn_k)
    fill_eval(rows, heads)
    experiment = f"{c.out}/tune/{name}"
    files = write_summary(loc, rows, c, experiment)
    run = {"restored": restored, "trials": len(rows), "concurrency": conc}
    finish_write(loc, _manifest(c, ctx, experiment, run, cpus_per, clock, files, st))
    print(f"[sweep] summary: {c.out}/summary.md; TensorBoard: {experiment}", flush=True)
    return {
        "summary": f"{c.out}/summary.md",
        "experiment": experiment,
        "restored": restored,
        "rows": rows,
    }


def _resolve(c: SweepConfig) -> tuple[SweepConfig, int, float]:
    """The sweep with absolute URIs and the workers the cluster gives each trial, checked
    before and after that choice; with the trials run at once and each one's CPUs."""
    c = replace(c, out=absolute(c.out))
    if c.sampler_checkpoint:
        c = replace(c, sampler_checkpoint=absolute(c.sampler_checkpoint))
    validate(c)
    workers, use_gpu, conc, cpus_per = _resources(c)
    c = replace(c, pretrain=replace(c.pretrain, workers=workers, use_gpu=use_gpu))
    validate(c)  # again with the workers gpus_per_trial gave (the batch must divide over them)
    return c, conc, cpus_per


def _prepare(
    c: SweepConfig, st: Stages
) -> tuple[TrialContext, dict[str, Any], dict[str, dict[str, Any]]]:
    """The stages every trial shares, done (or reused) before Tune starts: the data, the
    sampler, its embeddings and one mining per distinct sampler config. Returns what the
    trials share, the data's manifest, and each mining's manifest by its URI."""
    data_uri, data = prepare_data(st, c.source, c.format, c.source_options, c.images)
    _check_monitor(c, data)
    data_fp = dataset_fingerprint(data)
    p = c.pretrain
    budget = plain_steps(data, p.split, p.batch_size, p.epochs) if c.equal_compute else None
    boot = plain_steps(data, p.split, p.batch_size, c.bootstrap_epochs) if budget else None
    sampler = sampler_checkpoint(
        st, c.sampler_checkpoint, p, data_uri, data_fp, c.bootstrap_epochs, boot
    )
    emb_uri, _ = embed_stage(st, data_uri, data_fp, sampler, p.split)
    pairs: dict[str, str] = {}
    mined: dict[str, dict[str, Any]] = {}
    for m in grid(axes(c), MINING_KEYS):  # every distinct sampler config, mined once, up front
        mcfg = mining_for(c.mining, m)
        uri, manifest = mine_stage(st, emb_uri, data_fp, sampler, mcfg, p.split)
        pairs[stage_hash(asdict(mcfg))], mined[uri] = uri, manifest
    ctx = TrialContext(
        base=p,
        mining=c.mining,
        pairs_mode=c.pairs_mode,
        metric=c.metric,
        out=c.out,
        data_uri=data_uri,
        data_fp=data_fp,
        pairs=pairs,
        num_pairs={u: int(m.get("num_pairs", 0)) for u, m in mined.items()},
        budget=budget,
        n_train=split_size(data, p.split),
    )
    return ctx, data, mined


def _asha_clock(c: SweepConfig, ctx: TrialContext) -> tuple[int, int]:
    """(max_t, grace period) in optimizer steps. Trials report every plain epoch of steps:
    the grace period falls on a report of each."""
    plans = [trial_plan(ctx, trial_pretrain(ctx, t)) for t in grid(axes(c))]
    return max(x["total_steps"] for x in plans), c.grace_period * report_steps(ctx)


def _experiment_name(c: SweepConfig, ctx: TrialContext) -> str:
    """The Tune experiment's name: a hash of all that defines the sweep, so a rerun of the
    same sweep finds (and restores) its experiment."""
    return "sweep-" + stage_hash(
        {
            "data": ctx.data_fp,
            "pairs": ctx.pairs,
            "pretrain": asdict(c.pretrain),
            "axes": axes(c),
            "asha": [c.grace_period, c.reduction_factor, c.metric, c.mode, "step"],
            "budget": ctx.budget,
        }
    )


def _manifest(
    c: SweepConfig,
    ctx: TrialContext,
    experiment: str,
    run: dict[str, Any],
    cpus_per: float,
    clock: tuple[int, int],
    files: dict[str, str],
    st: Stages,
) -> dict[str, Any]:
    """The sweep's manifest: its experiment, the scheduler as it ran, the summary's files."""
    return {
        "kind": "sweep",
        "experiment": experiment,
        **run,
        "cpus_per_trial": cpus_per,
        "scheduler": {
            "name": "ASHA",
            "time_attr": "step",
            "max_t": clock[0],
            "grace_period": clock[1],
            "grace_period_epochs": c.grace_period,
            "report_every_steps": report_steps(ctx),
            "reduction_factor": c.reduction_factor,
            "metric": c.metric,
            "mode": c.mode,
            "split": c.pretrain.monitor_split if c.metric.startswith("knn") else None,
        },
        "budget_steps": ctx.budget,
        "files": files,
        "stages": st.timings,
        "config": json.loads(json.dumps(asdict(c), default=str)),
    }


def run_sweep_command(c: SweepConfig) -> int:
    """`sepp sweep`'s entry point."""
    r = run_sweep(c)
    say(f"summary: {r['summary']}")
    return 0
