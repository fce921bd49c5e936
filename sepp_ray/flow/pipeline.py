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

import json
import logging
import statistics
from dataclasses import dataclass, replace
from typing import Any

from sepp_ray.config import opt
from sepp_ray.console import say
from sepp_ray.data.dataset import dataset_fingerprint
from sepp_ray.errors import SeppError
from sepp_ray.flow.stages import (
    FlowConfig,
    Stages,
    eval_stage,
    mine_stage,
    prepare_data,
    sampler_checkpoint,
    train_stage,
)
from sepp_ray.storage import Location, absolute, filesystem
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
}
MINED = ("ap", "sp", "multi_positive", "cancel")  # the arms that need mined pairs
USES = {"multi_positive": "attract", "cancel": "cancel"}  # pairs in the loss: not every method
METRICS = (("kNN top-1", "knn"), ("linear top-1", "linear"))


@dataclass
class PipelineConfig(FlowConfig):
    work: str = opt("runs/pipeline", "where every stage's output goes (local path or s3://)")
    arms: list[str] = opt(
        ["plain", "ap", "sp"],
        "what to train and compare: plain, ap (augmentation pairs), sp (semantic pairs), "
        "multi_positive, cancel (false-negative cancellation), curated (needs `curated`)",
    )
    seeds: int = opt(3, "runs per arm, seeded pretrain.seed, +1, ...; arms share each seed")
    curated: str | None = opt(None, "the curated arm's Parquet table of pairs (image_a, image_b)")
    protocols: list[str] = opt(["knn", "linear"], "evaluation protocols")


def arm_pairs(arm: str, pairs_uri: str | None, curated: str | None) -> PairsConfig:
    """How the pairs enter training in ``arm``."""
    mode, ap = ARMS[arm]
    if arm == "curated":
        return PairsConfig(mode=mode, curated=curated)
    return PairsConfig(
        pairs=pairs_uri if arm != "plain" else None, mode=mode, augmentation_pairs=ap
    )


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
    from sepp_ray.methods.base import check_pair_use

    for arm in c.arms:  # the method must honour each arm's use of the pairs
        if arm in USES:
            check_pair_use(c.pretrain.method, USES[arm])
        # the arm's pairs as it will train with them: the table the mining stage writes
        pairs = arm_pairs(arm, "<the pairs this pipeline mines>", c.curated)
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

    # 2-3. the sampler (given, or bootstrapped by a plain run) and the pairs it mines
    pairs_uri, pairs = None, None
    if any(a in MINED for a in c.arms):
        boot = budget(c.bootstrap_epochs)
        sampler = sampler_checkpoint(
            st, c.sampler_checkpoint, p, data_uri, data_fp, c.bootstrap_epochs, boot
        )
        pairs_uri, pairs = mine_stage(st, data_uri, data_fp, sampler, c.mining, p.split)
    # 4. every arm at every seed, the same optimizer steps for all
    runs: list[dict[str, Any]] = []
    for i in range(c.seeds):
        seed = p.seed + i
        for arm in c.arms:
            pc = arm_pairs(arm, pairs_uri, c.curated)
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
    report = write_pipeline_report(c, data_uri, pairs_uri, pairs, rows, eval_uri, st)
    say(f"[pipeline] report: {report}")
    return {
        "report": report,
        "timings": st.timings,
        "reused": st.reused,
        "runs": rows,
        "summary": summarize(rows, c.arms),
    }


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
        "checkpoint": m["final_checkpoint"],
        **{key: head.get(name) for name, key in METRICS},
    }


def _spread(xs: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None with one value) of ``xs``."""
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs) if xs else None,
        "std": statistics.stdev(xs) if len(xs) > 1 else None,
    }


def summarize(rows: list[dict[str, Any]], arms: list[str]) -> dict[str, dict[str, Any]]:
    """Per arm and metric: mean and spread over seeds, and the paired difference to plain
    (arm minus plain at the same seed), which cancels what a seed does to both."""
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        out[arm] = {}
        for _, key in METRICS:
            mine = {r["seed"]: r[key] for r in rows if r["arm"] == arm and r[key] is not None}
            base = {r["seed"]: r[key] for r in rows if r["arm"] == "plain" and r[key] is not None}
            diffs = [mine[s] - base[s] for s in sorted(mine) if s in base]
            out[arm][key] = {
                **_spread(list(mine.values())),
                "diff": _spread(diffs) if arm != "plain" else None,
            }
    return out


def _pm(s: dict[str, Any] | None, signed: bool = False) -> str:
    """'mean ± std' in %, '—' when there is no value."""
    if not s or s["mean"] is None:
        return "—"
    mean = f"{100 * s['mean']:+.2f}" if signed else f"{100 * s['mean']:.2f}"
    return mean + (f" ± {100 * s['std']:.2f}" if s["std"] is not None else "")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _items(items: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in items.items() if n) or "none"


def write_pipeline_report(
    c: PipelineConfig,
    data_uri: str,
    pairs_uri: str | None,
    pairs: dict[str, Any] | None,
    rows: list[dict[str, Any]],
    eval_uri: str,
    st: Stages,
) -> str:
    from sepp_ray.mining.pairs_report import write_report

    out = f"{st.work}/report"
    pictures = write_report(pairs_uri, out) if pairs_uri else []
    table = Location(eval_uri).read_bytes("metrics.md").decode()
    summary = summarize(rows, c.arms)
    p = c.pretrain
    budget = rows[0]["budget_steps"]
    lines = [
        "# sepp-ray pipeline report",
        "",
        f"- data: `{data_uri}`",
        f"- method: {p.method}, backbone {p.backbone}, {p.epochs} epochs of the plain run, "
        f"batch {p.batch_size}; arms {', '.join(c.arms)}; seeds "
        f"{', '.join(str(p.seed + i) for i in range(c.seeds))}",
        "- compute: "
        + (
            f"equal, {budget} optimizer steps for every run (the plain run's; arms with more "
            "items run fewer epochs)"
            if c.equal_compute
            else "equal epochs (equal_compute=false: arms with more items take more steps)"
        ),
    ]
    if pairs:
        prec = (pairs.get("precision") or {}).get("overall")
        lines += [
            f"- sampler: `{pairs['encoder']['identity']}`",
            f"- pairs: {pairs['num_pairs']} for {pairs['anchors_with_positive']} of "
            f"{pairs['k']} anchors in [{pairs['lo']}, {pairs['hi']}]"
            + (f", pair precision {prec:.3f}" if prec is not None else ""),
        ]
    lines += [
        "",
        "## Accuracy per arm on the test split (%, mean ± std over seeds)",
        "",
        "Paired difference: the arm minus plain at the same seed, mean ± std over seeds.",
        "",
        "| arm | seeds | kNN top-1 | vs plain | linear top-1 | vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for arm in c.arms:
        s = summary[arm]
        lines.append(
            f"| {arm} | {s['knn']['n'] or s['linear']['n']} | {_pm(s['knn'])} | "
            f"{_pm(s['knn']['diff'], True)} | {_pm(s['linear'])} | "
            f"{_pm(s['linear']['diff'], True)} |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "| arm | seed | items | steps/epoch | epochs | optimizer steps | kNN top-1 "
        "| linear top-1 |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['arm']} | {r['seed']} | {_items(r['items'])} | {r['steps_per_epoch']} | "
            f"{r['epochs_run']} | {r['total_steps']} | {_pct(r['knn'])} | {_pct(r['linear'])} |"
            for r in rows
        ],
        "",
        "## Every checkpoint (the evaluation's own table)",
        "",
        table,
        "",
        "## Stage wall time (s; 0 = reused)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in st.timings.items()],
    ]
    if pictures:
        lines += ["", "## Pairs", ""]
        lines += [f"![]({x.rsplit('/', 1)[1]})" for x in pictures if x.endswith(".png")]
    fs, path = filesystem(out)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/README.md", "wb") as f:
        f.write("\n".join(lines).encode())
    with fs.open(f"{path}/results.json", "wb") as f:
        f.write(json.dumps({"runs": rows, "summary": summary}, indent=2).encode())
    return f"{out}/README.md"


def run_pipeline_command(c: PipelineConfig) -> int:
    """`sepp pipeline`'s entry point (the run's last console line names the report)."""
    run_pipeline(c)
    return 0
