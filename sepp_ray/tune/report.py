"""What a sweep leaves behind: one row per trial, their evaluation, a table and two plots.

A trial's row joins three sources: Tune's results at fixed optimizer steps (what ASHA saw),
the trial's own pretraining output (its newest checkpoint, also for a trial ASHA stopped) and
the mined pairs it trained with (count and pair precision). Trials are ranked, and the plots
drawn, on what ASHA read: the kNN monitor on the validation split. Test accuracies are those of
one ``sepp eval`` over every trial's newest checkpoint, read once at the end and never used to
choose: all trials are judged by the same protocol in one table.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from typing import Any

from sepp_ray.flow.stages import complete
from sepp_ray.storage import Location
from sepp_ray.tune.space import TrialContext, mining_for, trial_out, trial_plan, trial_pretrain

PARAMS = ("lo", "hi", "k", "method", "backbone", "base_lr", "temperature", "seed")
CURVE = ("epoch", "step", "loss", "knn_top1", "knn_top5")


def _num(v: Any) -> Any:
    """NaN (an epoch without a kNN result in Tune's table) as None, numpy scalars as Python."""
    if v is None:
        return None
    if isinstance(v, (int, float)) or hasattr(v, "item"):
        f = float(v)
        return None if math.isnan(f) else (int(f) if f.is_integer() and abs(f) < 2**53 else f)
    return v


def _history(result: Any, metric: str) -> list[dict[str, Any]]:
    """Tune's results of a trial (one per report, at fixed steps): the learning curve and
    the metric ASHA saw."""
    df = result.metrics_dataframe
    if df is None or "epoch" not in df:
        return []
    cols = [c for c in dict.fromkeys((*CURVE, metric)) if c in df]
    return [{c: _num(v) for c, v in zip(cols, vals, strict=True)} for vals in df[cols].values]


def collect_rows(
    grid: Any, ctx: TrialContext, mined: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per Tune trial, in trial order (the order trials started in)."""
    from sepp_ray.methods import make_hparams
    from sepp_ray.train.state import list_checkpoints

    rows: list[dict[str, Any]] = []
    for result in grid:
        params = dict(result.config or {})
        cfg, mcfg = trial_pretrain(ctx, params), mining_for(ctx.mining, params)
        out, plan = trial_out(ctx, cfg), trial_plan(ctx, cfg)
        history = _history(result, ctx.metric)
        steps, planned = _progress(history, plan, complete(out))
        finished = steps >= plan["total_steps"]
        run = planned if finished else steps // plan["steps_per_epoch"]  # whole epochs done
        # the newest checkpoint the trial reached by its last result (what ASHA judged)
        ckpts = [u for e, u in list_checkpoints(out) if e <= run]
        pairs = mined.get(cfg.pairs.pairs or "", {})
        monitor = [h["knn_top1"] for h in history if h.get("knn_top1") is not None]
        selection = [h[ctx.metric] for h in history if h.get(ctx.metric) is not None]
        hp = make_hparams(cfg.method, **cfg.hparams)
        err = result.error
        rows.append(
            {
                "trial": posixpath.basename(str(result.path).rstrip("/")),
                "status": "error" if err else ("done" if finished else "stopped"),
                "error": f"{type(err).__name__}: {err}" if err else None,
                "lo": mcfg.lo,
                "hi": mcfg.hi,
                "k": mcfg.k,
                "method": cfg.method,
                "backbone": cfg.backbone,
                "base_lr": cfg.base_lr,
                "temperature": getattr(hp, "temperature", None),
                "seed": cfg.seed,
                "pairs_uri": cfg.pairs.pairs,
                "pairs": pairs.get("num_pairs"),
                "precision": (pairs.get("precision") or {}).get("overall"),
                "epochs": planned,
                "epochs_run": run,
                "steps_run": steps,
                "stopped_early": not finished,
                "total_steps": plan["total_steps"],
                "monitor_top1": monitor[-1] if monitor else None,
                "selection": selection[-1] if selection else None,
                "history": history,
                "out": out,
                "checkpoint": ckpts[-1] if ckpts else None,
                "eval": {},
                "top1": None,
                "test_top1": None,
            }
        )
    return sorted(rows, key=lambda r: r["trial"])


def _progress(
    history: list[dict[str, Any]], plan: dict[str, int], done: dict[str, Any] | None
) -> tuple[int, int]:
    """(optimizer steps the trial reported, epochs it plans): a finished run's manifest says
    it ran all its steps; otherwise the last step Tune saw (what ASHA judged)."""
    steps = max([int(h["step"]) for h in history if h.get("step")] or [0])
    if done is None:
        return steps, plan["epochs"]
    total = int(done.get("total_steps", plan["total_steps"]))
    return max(steps, total), int(done.get("epochs_run", done["epochs"]))


def fill_eval(rows: list[dict[str, Any]], heads: dict[str, dict[str, float]]) -> None:
    """Fill the rows' ``eval`` (the headline of one ``sepp eval`` of every trial's checkpoint
    on the test split) and ``test_top1`` (kNN, else linear), and ``top1``, the accuracy the
    plots show: the validation monitor's, as plots guide choices."""
    for r in rows:
        r["eval"] = heads.get(r["checkpoint"], {})
        r["test_top1"] = r["eval"].get("kNN top-1", r["eval"].get("linear top-1"))
        r["top1"] = r["monitor_top1"]


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _cell(v: Any) -> str:
    return "—" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def ranked(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best first by the selection metric (what ASHA read, on validation), per ``mode``;
    trials without a value last. Test accuracies play no part."""
    sign = 1.0 if mode == "max" else -1.0
    return sorted(
        rows,
        key=lambda r: (r["selection"] is not None, sign * (r["selection"] or 0.0)),
        reverse=True,
    )


def summary_markdown(rows: list[dict[str, Any]], c: Any, experiment: str) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r["eval"]))
    best = ranked(rows, c.mode)
    split = c.pretrain.monitor_split if c.metric.startswith("knn") else "train"
    budget = rows[0]["total_steps"] if rows and c.equal_compute else None
    count = {s: sum(r["status"] == s for r in rows) for s in ("done", "stopped", "error")}
    lines = [
        "# sepp-ray sweep",
        "",
        f"- base: {c.pretrain.method}, backbone {c.pretrain.backbone}, {c.pretrain.epochs} "
        f"epochs, batch {c.pretrain.batch_size}; pairs mode {c.pairs_mode}",
        f"- {len(rows)} trials: {count['done']} ran all epochs, {count['stopped']} stopped "
        f"early by ASHA (grace {c.grace_period}, reduction {c.reduction_factor:g}, "
        f"{c.metric} {c.mode}), {count['error']} failed",
        f"- selection: ASHA and this ranking read {c.metric} on the {split!r} split; the test "
        "columns come from one evaluation at the end and choose nothing",
        "- compute: "
        + (
            f"equal, {budget} optimizer steps per trial (the plain run's)"
            if budget
            else "equal epochs (equal_compute=false)"
        ),
        f"- Tune experiment (TensorBoard: `tensorboard --logdir {experiment}`)",
        "",
        f"## Trials, best {c.metric} on {split!r} first (accuracies in %; eval columns: test)",
        "",
        "| trial | "
        + " | ".join(PARAMS)
        + f" | pairs | pair precision | {split} kNN top-1 | "
        + "".join(f"{col} | " for col in cols)
        + "epochs run | optimizer steps | stopped early |",
        "|---" * (len(PARAMS) + 7 + len(cols)) + "|",
    ]
    for r in best:
        cells = [_cell(r[p]) for p in PARAMS]
        evals = [_pct(r["eval"].get(col)) for col in cols]
        lines.append(
            f"| {r['trial']} | " + " | ".join(cells) + f" | {_cell(r['pairs'])} | "
            f"{_pct(r['precision'])} | {_pct(r['monitor_top1'])} | "
            + "".join(f"{e} | " for e in evals)
            + f"{r['epochs_run']}/{r['epochs']} | {r['steps_run']}/{r['total_steps']} | "
            + f"{'yes' if r['stopped_early'] else 'no'} |"
        )
    errors = [r for r in rows if r["error"]]
    if errors:
        lines += ["", "## Failed trials", ""] + [f"- {r['trial']}: {r['error']}" for r in errors]
    lines += ["", "![accuracy versus threshold](acc_vs_threshold.png)", ""]
    lines += ["![accuracy versus K](acc_vs_k.png)", ""]
    return "\n".join(lines)


def accuracy_plot(rows: list[dict[str, Any]], x: str, series: tuple[str, ...], title: str) -> bytes:
    """PNG: top-1 against ``x``, one line (mean over the other keys) per value of ``series``;
    hollow markers are trials ASHA stopped early."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    pts = [r for r in rows if r["top1"] is not None and r[x] is not None]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in pts:
        groups.setdefault(tuple(r[s] for s in series), []).append(r)
    for key, rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        label = ", ".join(f"{s}={v:g}" for s, v in zip(series, key, strict=True)) or None
        xs = sorted({r[x] for r in rs})
        means = [
            100 * sum(r["top1"] for r in rs if r[x] == v) / sum(r[x] == v for r in rs) for v in xs
        ]
        (line,) = ax.plot(xs, means, "-", label=label)
        for r in rs:
            face = "none" if r["stopped_early"] else line.get_color()
            ax.plot(r[x], 100 * r["top1"], "o", mfc=face, mec=line.get_color())
    ax.set_xlabel(x)
    ax.set_ylabel("validation kNN top-1 (%)")
    ax.set_title(title)
    if any(ax.get_legend_handles_labels()[1]):
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_summary(
    loc: Location, rows: list[dict[str, Any]], c: Any, experiment: str
) -> dict[str, str]:
    """summary.md, the two plots and results.json into the sweep's output (manifest after)."""
    loc.write_bytes("summary.md", summary_markdown(rows, c, experiment).encode())
    loc.write_bytes(
        "acc_vs_threshold.png",
        accuracy_plot(rows, "lo", ("hi",), "accuracy versus lower threshold"),
    )
    loc.write_bytes("acc_vs_k.png", accuracy_plot(rows, "k", ("lo", "hi"), "accuracy versus K"))
    loc.write_bytes(
        "results.json", json.dumps({"experiment": experiment, "rows": rows}, indent=2).encode()
    )
    return {
        "summary": "summary.md",
        "results": "results.json",
        "plots": "acc_vs_threshold.png,acc_vs_k.png",
    }
