"""`sepp pipeline`: ingest -> (bootstrap sampler) -> mine -> pretrain baseline and SePP -> eval
-> report, every stage's output on storage and reused when its inputs and config are unchanged.

Each stage writes to ``WORK/<stage>-<hash>`` and is reused when complete, continued when not
(``sepp_ray.prepare``). With no sampler checkpoint given, the pipeline bootstraps one: a plain
run of the method, whose encoder then mines the pairs (as in arXiv 2306.16122's bootstrap).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from sepp_ray.config import opt
from sepp_ray.prepare import (
    FlowConfig,
    Stages,
    mine_stage,
    prepare_data,
    sampler_checkpoint,
    train_stage,
)
from sepp_ray.storage import Location, absolute, filesystem, read_manifest
from sepp_ray.train.items import PairsConfig

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig(FlowConfig):
    work: str = opt("runs/pipeline", "where every stage's output goes (local path or s3://)")
    protocols: list[str] = opt(["knn", "linear"], "evaluation protocols")


def run_pipeline(c: PipelineConfig) -> dict[str, Any]:
    from sepp_ray.eval.command import EvalConfig, run_eval

    c = replace(c, work=absolute(c.work))
    if c.sampler_checkpoint:
        c = replace(c, sampler_checkpoint=absolute(c.sampler_checkpoint))
    st = Stages(c.work)
    c.mining.validate()
    # fail fast, before any stage runs: a typo must not surface hours in, after training
    replace(c.pretrain, dataset="x", out="x").validate()
    PairsConfig(pairs="x", mode=c.pairs_mode).validate()
    EvalConfig(checkpoints=["x"], dataset="x", out="x", protocols=list(c.protocols)).validate()

    # 1. ingest, unless the source already is an ingested dataset
    data_uri, data = prepare_data(st, c.source, c.format, c.source_options, c.images)
    data_fp = data["source"]["fingerprint"]

    def train(name: str, epochs: int, pairs: PairsConfig) -> tuple[str, dict[str, Any]]:
        return train_stage(st, name, c.pretrain, data_uri, data_fp, epochs, pairs)

    # 2. the sampler: given, or bootstrapped by a plain run
    sampler = sampler_checkpoint(
        st, c.sampler_checkpoint, c.pretrain, data_uri, data_fp, c.bootstrap_epochs
    )
    # 3. mine
    pairs_uri, pairs = mine_stage(st, data_uri, data_fp, sampler, c.mining, c.pretrain.split)
    # 4. baseline and SePP, same epochs, batch and seed
    _, base = train("baseline", c.pretrain.epochs, PairsConfig(mode="none"))
    _, sepp = train("sepp", c.pretrain.epochs, PairsConfig(pairs=pairs_uri, mode=c.pairs_mode))
    # 5. evaluate both in one table
    ckpts = [base["final_checkpoint"], sepp["final_checkpoint"]]
    eval_uri, _ = st.run(
        "eval",
        {
            "ckpts": [read_manifest(x).get("sha256") for x in ckpts],
            "data": data_fp,
            "protocols": c.protocols,
        },
        lambda uri: run_eval(
            EvalConfig(
                checkpoints=ckpts,
                dataset=data_uri,
                protocols=list(c.protocols),
                out=uri,
                overwrite=True,
                k=min(200, data["splits"].get("train", {}).get("total", 200)),
            )
        ),
    )
    # 6. the report
    report = write_pipeline_report(c, data_uri, pairs_uri, pairs, base, sepp, eval_uri, st)
    print(f"[pipeline] report: {report}", flush=True)
    return {"report": report, "timings": st.timings, "reused": st.reused}


def _items(run: dict[str, Any]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in run["items"].items() if n) or "none"


def write_pipeline_report(
    c: PipelineConfig,
    data_uri: str,
    pairs_uri: str,
    pairs: dict[str, Any],
    base: dict[str, Any],
    sepp: dict[str, Any],
    eval_uri: str,
    st: Stages,
) -> str:
    from sepp_ray.mining.pairs_report import write_report

    out = f"{st.work}/report"
    pictures = write_report(pairs_uri, out)
    loc = Location(eval_uri)
    table = loc.read_bytes("metrics.md").decode()
    prec = (pairs.get("precision") or {}).get("overall")
    lines = [
        "# sepp-ray pipeline report",
        "",
        f"- data: `{data_uri}`",
        f"- method: {c.pretrain.method}, backbone {c.pretrain.backbone}, "
        f"{c.pretrain.epochs} epochs, batch {c.pretrain.batch_size}, seed {c.pretrain.seed}",
        f"- sampler: `{pairs['encoder']['identity']}`",
        f"- pairs: {pairs['num_pairs']} for {pairs['anchors_with_positive']} of {pairs['k']} "
        f"anchors in [{pairs['lo']}, {pairs['hi']}]"
        + (f", pair precision {prec:.3f}" if prec is not None else ""),
        f"- training items: baseline {_items(base)}; SePP {_items(sepp)}",
        "",
        "## Accuracy: baseline (first row) versus SePP (second row)",
        "",
        table,
        "",
        "## Stage wall time (s; 0 = reused)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in st.timings.items()],
        "",
        "## Pairs",
        "",
        *[f"![]({p.rsplit('/', 1)[1]})" for p in pictures if p.endswith(".png")],
    ]
    fs, path = filesystem(out)
    with fs.open(f"{path}/README.md", "wb") as f:
        f.write("\n".join(lines).encode())
    return f"{out}/README.md"
