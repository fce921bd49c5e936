"""`sepp pipeline`: ingest -> (bootstrap sampler) -> mine -> pretrain every arm over seeds
-> eval -> report, every stage's output on storage and reused when its inputs and config are
unchanged.

Each stage writes to ``WORK/<stage>-<hash>`` and is reused when complete, continued when not
(``sepp_ray.flow.stages``). With no sampler checkpoint given, the pipeline bootstraps one: a plain
run of the method, whose encoder then mines the pairs (as in arXiv 2306.16122's bootstrap).

A SePP result is worth only as much as its control, so the pipeline trains every arm of the
comparison (plain; augmentation pairs, the control with the same item count; semantic pairs;
optionally multi-positive, false-negative cancellation and curated pairs), each over ``seeds``
seeds, all with the plain run's optimizer steps (``sepp_ray.train.budget``), and reports per
arm the mean and spread over seeds and the paired difference to plain at the same seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from sepp_ray.config import opt
from sepp_ray.console import say
from sepp_ray.data.dataset import dataset_fingerprint
from sepp_ray.errors import SeppError
from sepp_ray.flow.pipeline_report import METRICS, summarize, write_pipeline_report
from sepp_ray.flow.stages import (
    FlowConfig,
    Stages,
    eval_stage,
    mine_stage,
    prepare_data,
    train_stage,
)
from sepp_ray.mining.mine import MineConfig
from sepp_ray.storage import absolute
from sepp_ray.train.budget import plain_steps
from sepp_ray.train.items import PairsConfig

log = logging.getLogger(__name__)
# arm -> (pairs.mode, augmentation_pairs); "curated" trains on the `curated` table instead
ARMS: dict[str, tuple[str, bool]] = {
    "plain": ("none", False),
    "ap": ("dataset", True),  # augmentation pairs: the control with the same item count
    "sp": ("dataset", False),  # semantic pairs, SePP-CID's dataset mode (arXiv 2306.16122)
    "multi_positive": ("multi_positive", False),
    "cancel": ("cancel", False),  # false-negative cancellation (Huynh et al., WACV 2022)
    "curated": ("dataset", False),  # a curated semantic-pairs table (arXiv 2510.08722)
    # semantic pairs re-mined every `remine_every` epochs by the encoder in training
    "sp-remine": ("dataset", False),
}
MINED = ("ap", "sp", "multi_positive", "cancel", "sp-remine")  # the arms that need mined pairs
USES = {"multi_positive": "attract", "cancel": "cancel"}  # pairs in the loss: not every method
# A bootstrapped sampler is a short plain run: a weak encoder whose similarities crowd near 1,
# so a window like [0.9, 0.99] accepts hundreds of positives per anchor (386 per anchor on a
# 20-class ImageNet subset after 2 bootstrap epochs) and the pair items swamp the originals.
# Its default cap is the positives per image the multi-positive loss keeps (pairs.max_positives),
# which bounds the pair items at 4 x K: at the paper's K = 5% a fifth of the originals.
BOOTSTRAP_MAX_POSITIVES = 4


@dataclass
class PipelineConfig(FlowConfig):
    work: str = opt("runs/pipeline", "where every stage's output goes (local path or s3://)")
    arms: list[str] = opt(
        ["plain", "ap", "sp"],
        "what to train and compare: plain, ap (augmentation pairs), sp (semantic pairs), "
        "multi_positive, cancel (false-negative cancellation), curated (needs `curated`), "
        "sp-remine (semantic pairs re-mined during training, every `remine_every` epochs)",
    )
    remine_every: int | None = opt(
        None,
        "the sp-remine arm's epochs between re-mining rounds (default: a quarter of "
        "pretrain.epochs, at least 1)",
    )
    remine_encoder: str = opt(
        "auto", "the sp-remine arm's encoder: auto (momentum where the method has one), online"
    )
    seeds: int = opt(3, "runs per arm, seeded pretrain.seed, +1, ...; arms share each seed")
    curated: str | None = opt(None, "the curated arm's Parquet table of pairs (image_a, image_b)")
    protocols: list[str] = opt(["knn", "linear"], "evaluation protocols")
    sampler_per_seed: bool = opt(
        False,
        "bootstrap the sampler (with no sampler_checkpoint) and mine the pairs again for each "
        "seed, anchors seeded per seed, so the spread over seeds includes the sampler's; false: "
        "one sampler and one mining for all seeds",
    )
    bootstrap_max_positives: int | None = opt(
        BOOTSTRAP_MAX_POSITIVES,
        "a bootstrapped sampler's cap on positives per anchor (mining.m, when mining.m is "
        "unset): a weak sampler accepts hundreds per anchor; null: no cap",
    )


def arm_pairs(
    arm: str, pairs_uri: str | None, curated: str | None, c: PipelineConfig | None = None
) -> PairsConfig:
    """How the pairs enter training in ``arm`` (``c``: the pipeline, for sp-remine's rounds)."""
    mode, ap = ARMS[arm]
    if arm == "curated":
        return PairsConfig(mode=mode, curated=curated)
    pairs = PairsConfig(
        pairs=pairs_uri if arm != "plain" else None, mode=mode, augmentation_pairs=ap
    )
    if arm != "sp-remine":
        return pairs
    if c is None:
        raise SeppError("the sp-remine arm needs the pipeline's remine_every")
    every = c.remine_every or max(1, c.pretrain.epochs // 4)
    return replace(pairs, remine_every=every, remine_encoder=c.remine_encoder)


def check_arms(c: PipelineConfig) -> None:
    """Arms and seeds, checked before any stage runs."""
    unknown = [a for a in c.arms if a not in ARMS]
    if unknown:
        raise SeppError(f"unknown arm(s) {unknown}: choose among {list(ARMS)}")
    if len(set(c.arms)) != len(c.arms):
        raise SeppError(f"an arm is listed twice in arms={c.arms}")
    if "plain" not in c.arms:
        raise SeppError("arms must include plain: every other arm is compared with it")
    if "curated" in c.arms and not c.curated:
        raise SeppError("the curated arm needs curated=TABLE (a Parquet table image_a, image_b)")
    if c.seeds < 1:
        raise SeppError(f"seeds must be >= 1, got {c.seeds}")
    if c.remine_every is not None and "sp-remine" not in c.arms:
        raise SeppError("remine_every sets the sp-remine arm's rounds: add sp-remine to arms")
    from sepp_ray.methods.base import check_pair_use

    for arm in c.arms:  # the method must honour each arm's use of the pairs
        if arm in USES:
            check_pair_use(c.pretrain.method, USES[arm])
        # the arm's pairs as it will train with them: the table the mining stage writes
        pairs = arm_pairs(arm, "<the pairs this pipeline mines>", c.curated, c)
        replace(c.pretrain, pairs=pairs).validate_settings()


def run_pipeline(c: PipelineConfig) -> dict[str, Any]:
    from sepp_ray.eval.command import EvalConfig

    c = replace(c, work=absolute(c.work))
    if c.sampler_checkpoint:
        c = replace(c, sampler_checkpoint=absolute(c.sampler_checkpoint))
    if c.curated:
        c = replace(c, curated=absolute(c.curated))
    st = Stages(c.work)
    # fail fast, before any stage runs: a typo must not surface hours in, after training
    c.mining.validate()
    check_arms(c)
    EvalConfig(protocols=list(c.protocols), k=c.pretrain.knn_k).validate_settings()

    # 1. ingest, unless the source already is an ingested dataset
    data_uri, data = prepare_data(st, c.source, c.format, c.source_options, c.images)
    data_fp = dataset_fingerprint(data)
    p = c.pretrain

    def budget(epochs: int) -> int | None:  # the plain run's steps at these epochs
        return plain_steps(data, p.split, p.batch_size, epochs) if c.equal_compute else None

    # 2-3. the sampler (given, or bootstrapped by a plain run) and the pairs it mines: one for
    # all seeds, or one per seed (sampler_per_seed)
    found = samplers(st, c, data_uri, data_fp, budget(c.bootstrap_epochs))
    # 4. every arm at every seed, the same optimizer steps for all
    runs: list[dict[str, Any]] = []
    for i in range(c.seeds):
        seed = p.seed + i
        pairs_uri = found[seed].pairs_uri if seed in found else None
        for arm in c.arms:
            pc = arm_pairs(arm, pairs_uri, c.curated, c)
            name, cfg = f"{arm}-seed{seed}", replace(p, seed=seed)
            _, run = train_stage(
                st, name, cfg, data_uri, data_fp, p.epochs, pc, budget(p.epochs), folder=arm
            )
            runs.append({"arm": arm, "seed": seed, "manifest": run})
    # 5. evaluate all of them in one table, on the test split, once
    ckpts = [r["manifest"]["final_checkpoint"] for r in runs]
    eval_uri, heads = eval_stage(st, ckpts, data_uri, data, c.protocols, p.knn_k)
    if eval_uri is None:  # refused up front by EvalConfig's check; kept for the type
        raise SeppError("the pipeline needs at least one evaluation protocol")
    rows = [_row(r, heads.get(r["manifest"]["final_checkpoint"], {})) for r in runs]
    # 6. the report
    report = write_pipeline_report(c, data_uri, found, rows, eval_uri, st)
    say(f"[pipeline] report: {report}")
    return {
        "report": report,
        "timings": st.timings,
        "reused": st.reused,
        "runs": rows,
        "samplers": [x.to_dict() for x in found.values()],
        "summary": summarize(rows, c.arms),
    }


@dataclass(frozen=True)
class Sampler:
    """The sampler one seed's arms use and the pairs it mined. bootstrap_steps: the optimizer
    steps of the plain run that became the sampler (0: a given checkpoint), outside the arms'
    budget."""

    seed: int
    checkpoint: str
    bootstrap_steps: int
    pairs_uri: str
    pairs: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        keys = ("num_pairs", "anchors_with_positive", "k", "m", "positives_per_anchor")
        return {
            "seed": self.seed,
            "checkpoint": self.checkpoint,
            "bootstrap_steps": self.bootstrap_steps,
            "pairs_uri": self.pairs_uri,
            **{k: self.pairs.get(k) for k in keys},
        }


def mining_config(c: PipelineConfig, index: int) -> MineConfig:
    """The mining of the ``index``-th sampler: anchors seeded ``mining.seed + index`` (0 when
    one sampler serves every seed); a bootstrapped sampler's positives per anchor capped at
    ``bootstrap_max_positives`` unless ``mining.m`` is set."""
    m = c.mining
    if not c.sampler_checkpoint and m.m is None and c.bootstrap_max_positives:
        m = replace(m, m=c.bootstrap_max_positives)
    return replace(m, seed=m.seed + index)


def samplers(
    st: Stages, c: PipelineConfig, data_uri: str, data_fp: Any, boot_budget: int | None
) -> dict[int, Sampler]:
    """Seed -> the sampler and pairs its arms train with: one shared by every seed, or with
    ``sampler_per_seed`` one bootstrapped (unless given) and mined per seed, so the spread over
    seeds includes the sampler's. Empty when no arm needs mined pairs."""
    if not any(a in MINED for a in c.arms):
        return {}
    seeds = [c.pretrain.seed + i for i in range(c.seeds)]
    if not c.sampler_per_seed:
        one = _sampler(st, c, data_uri, data_fp, boot_budget, seeds[0], 0, "")
        return dict.fromkeys(seeds, one)
    return {
        s: _sampler(st, c, data_uri, data_fp, boot_budget, s, i, f"-seed{s}")
        for i, s in enumerate(seeds)
    }


def _sampler(
    st: Stages,
    c: PipelineConfig,
    data_uri: str,
    data_fp: Any,
    boot_budget: int | None,
    seed: int,
    index: int,
    tag: str,
) -> Sampler:
    """One sampler (given, or a plain run of ``bootstrap_epochs`` at ``seed``) and its pairs;
    ``tag`` names its stages (a bootstrap as long as the plain run of that seed is that run)."""
    p = replace(c.pretrain, seed=seed)
    ckpt, steps = c.sampler_checkpoint, 0
    if not ckpt:
        _, boot = train_stage(
            st,
            f"bootstrap{tag}",
            p,
            data_uri,
            data_fp,
            c.bootstrap_epochs,
            budget_steps=boot_budget,
        )
        ckpt, steps = str(boot["final_checkpoint"]), int(boot["total_steps"])
    mining = mining_config(c, index)
    uri, pairs = mine_stage(st, data_uri, data_fp, ckpt, mining, p.split, name=f"pairs{tag}")
    return Sampler(seed, ckpt, steps, uri, pairs)


def _row(run: dict[str, Any], head: dict[str, float]) -> dict[str, Any]:
    """One run's line of the report: its arm, seed, compute and test accuracies."""
    m = run["manifest"]
    spe = int(m["steps_per_epoch"])
    return {
        "arm": run["arm"],
        "seed": run["seed"],
        "items": m["items"],
        "steps_per_epoch": spe,
        "total_steps": int(m.get("total_steps", spe * m["epochs"])),
        "epochs_run": m.get("epochs_run", m["epochs"]),
        "budget_steps": m.get("budget_steps"),
        # pairs used over the run: pair items trained on, mined pairs in the loss
        "pair_items_used": m.get("pair_items"),
        "pairs_used": m.get("pairs_used"),
        "same_image_negatives": m.get("same_image_negatives"),
        "data_plane": (m.get("data_plane") or {}).get("mode"),
        # sp-remine: every round's pairs, count and precision (the others mine once)
        "rounds": m.get("rounds"),
        "checkpoint": m["final_checkpoint"],
        **{key: head.get(name) for name, key in METRICS},
    }


def run_pipeline_command(c: PipelineConfig) -> int:
    """`sepp pipeline`'s entry point (the run's last console line names the report)."""
    run_pipeline(c)
    return 0
