"""The pipeline's report: the setup, each arm's test accuracy against plain (mean and spread
over seeds, paired differences), every run with the compute and pairs it used, the re-mining
rounds of the `sp-remine` arm (pairs and precision per round), the samplers and the stages'
times. Written as README.md and results.json under the pipeline's ``report/``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from sepp_ray.storage import Location, filesystem

if TYPE_CHECKING:
    from sepp_ray.flow.stages import Stages
    from sepp_ray.train.config import PretrainConfig


class Setup(Protocol):
    """What the report reads of the pipeline's config (`PipelineConfig`)."""

    arms: list[str]
    seeds: int
    equal_compute: bool
    sampler_per_seed: bool
    sampler_checkpoint: str | None
    pretrain: PretrainConfig


class Mining(Protocol):
    """What the report reads of a sampler and its pairs (`sepp_ray.flow.pipeline.Sampler`)."""

    @property
    def seed(self) -> int: ...
    @property
    def bootstrap_steps(self) -> int: ...
    @property
    def pairs_uri(self) -> str: ...
    @property
    def pairs(self) -> dict[str, Any]: ...

    def to_dict(self) -> dict[str, Any]: ...


METRICS = (("kNN top-1", "knn"), ("linear top-1", "linear"))


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


def _count(v: int | None) -> str:
    return "—" if v is None else f"{v:,}"


def _items(items: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in items.items() if n) or "none"


def write_pipeline_report(
    c: Setup,
    data_uri: str,
    found: Mapping[int, Mining],
    rows: list[dict[str, Any]],
    eval_uri: str,
    st: Stages,
) -> str:
    """The pipeline's report (README.md: the setup, each arm against plain, every run and
    checkpoint, the stages' times, the pairs' pictures) and results.json; returns its URI."""
    from sepp_ray.mining.pairs_report import write_report

    out = f"{st.work}/report"
    first = next(iter(found.values()), None)
    pictures = write_report(first.pairs_uri, out) if first else []
    table = Location(eval_uri).read_bytes("metrics.md").decode()
    summary = summarize(rows, c.arms)
    lines = _report_setup(c, data_uri, rows[0]["budget_steps"]) + sampler_lines(c, found)
    lines += _arms_table(c, summary) + _runs_table(rows) + rounds_table(rows)
    lines += [
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
        body = {"runs": rows, "summary": summary, "samplers": [x.to_dict() for x in found.values()]}
        f.write(json.dumps(body, indent=2).encode())
    return f"{out}/README.md"


def _report_setup(c: Setup, data_uri: str, budget: int | None) -> list[str]:
    """The report's head: the data, the method and arms, and how compute was made equal."""
    p = c.pretrain
    return [
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


def _arms_table(c: Setup, summary: dict[str, Any]) -> list[str]:
    """Each arm's test accuracy over the seeds, and its paired difference to plain."""
    lines = [
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
    return lines


def _runs_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per run: its items, steps, the pairs it used and its accuracies."""
    return [
        "",
        "## Runs",
        "",
        "Pair items used: pair items trained on over the run (all ranks); mined pairs in "
        "the loss: anchor-positive links attracted or cancelled (multi-positive, cancel); "
        "same-image negatives: views of one image left among each other's negatives (0).",
        "",
        "| arm | seed | items | steps/epoch | epochs | optimizer steps | pair items used "
        "| mined pairs in the loss | same-image negatives | kNN top-1 | linear top-1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['arm']} | {r['seed']} | {_items(r['items'])} | {r['steps_per_epoch']} | "
            f"{r['epochs_run']} | {r['total_steps']} | {_count(r['pair_items_used'])} | "
            f"{_count(r['pairs_used'])} | {_count(r['same_image_negatives'])} | "
            f"{_pct(r['knn'])} | {_pct(r['linear'])} |"
            for r in rows
        ],
    ]


def rounds_table(rows: list[dict[str, Any]]) -> list[str]:
    """The re-mining rounds of every run that had them: each round's first epoch, pairs and
    pair precision (the share of pairs whose images share a label; None without labels)."""
    remined = [r for r in rows if r.get("rounds")]
    if not remined:
        return []
    lines = [
        "",
        "## Re-mining rounds",
        "",
        "Round 1 is the sampler's pairs; each later round was mined by the run's own encoder "
        "before its first epoch, at the same thresholds and anchors, at the same optimizer "
        "steps as every other arm.",
        "",
        "| arm | seed | round | from epoch | encoder | pairs | pair precision |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in remined:
        for x in r["rounds"]:
            prec = "—" if x["precision"] is None else f"{x['precision']:.3f}"
            lines.append(
                f"| {r['arm']} | {r['seed']} | {x['round']} | {x['start_epoch'] + 1} | "
                f"{x['encoder']} | {x['num_pairs']:,} | {prec} |"
            )
    return lines


def sampler_lines(c: Setup, found: Mapping[int, Mining]) -> list[str]:
    """The report's account of the samplers: shared or per seed (what the spread over seeds
    includes), the bootstrap's optimizer steps (outside the arms' budget) and each mining."""
    distinct = list({x.pairs_uri: x for x in found.values()}.values())
    if not distinct:
        return []
    if c.sampler_per_seed:
        made = "given; pairs" if c.sampler_checkpoint else "bootstrapped and pairs"
        how = f"one per seed ({made} mined again per seed): the spread over seeds includes it"
    else:
        how = "one for every seed, mined once: the spread over seeds leaves the sampler's out"
    steps = [x.bootstrap_steps for x in distinct]
    lines = [
        f"- sampler: {how}",
        f"- bootstrap: {len(steps)} plain run(s) of {steps[0]} optimizer steps, {sum(steps)} in "
        "all, outside the arms' budget (one as long as a plain arm is that arm's run)"
        if sum(steps)
        else "- bootstrap: none (sampler_checkpoint given; its training is not counted here)",
    ]
    for x in distinct:
        m = x.pairs
        prec = (m.get("precision") or {}).get("overall")
        per = m.get("positives_per_anchor") or {}
        seed = f" (seed {x.seed})" if len(distinct) > 1 else ""
        lines.append(
            f"- pairs{seed}: {m['num_pairs']} for {m['anchors_with_positive']} of {m['k']} "
            f"anchors in [{m['lo']}, {m['hi']}], at most {m.get('m') or 'all'} per anchor "
            f"(mean {per.get('mean')}, max {per.get('max')}); sampler "
            f"`{m['encoder']['identity']}`"
            + (f"; pair precision {prec:.3f}" if prec is not None else "")
        )
    return lines
