"""The Markdown tables of `sepp eval`: one row per checkpoint (accuracies, APs), and the
augmentation-ablation table (how far each run falls from the baseline without one transform).
"""

from __future__ import annotations

from typing import Any

from sepp_ray.errors import SeppError


def headline(entry: dict[str, Any]) -> dict[str, float]:
    """The table's columns of one checkpoint's metrics (accuracies and APs in [0, 1])."""
    out: dict[str, float] = {}
    for proto, label in (("knn", "kNN"), ("linear", "linear")):
        if proto in entry:
            out[f"{label} top-1"] = entry[proto]["top1"]
            out[f"{label} top-5"] = entry[proto]["top5"]
    for frac, res in sorted((entry.get("semisup") or {}).items(), key=lambda kv: float(kv[0])):
        out[f"semi {float(frac) * 100:g}% top-1"] = res["top1"]
    if "detection" in entry:
        for k in ("AP50", "AP", "AP75"):
            out[f"det {k}"] = entry["detection"][k]
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown: one row per checkpoint, one column per protocol metric (in %)."""
    rows = metrics["checkpoints"]
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r["headline"] if c not in cols]
    d = metrics.get("dataset")
    lines = []
    if d:
        lines.append(
            f"Evaluation data: `{d['uri']}` (train `{d['train_split']}`, "
            f"test `{d['test_split']}`); figures in %."
        )
    if metrics.get("voc_root"):
        lines.append(f"Detection: VOC-format `{metrics['voc_root']}` (AP from pycocotools).")
    lines += [
        "",
        "| checkpoint | backbone | pretrained on | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [_pct(r["headline"].get(c)) for c in cols]
        pre = r.get("pretrain_dataset") or "?"
        lines.append(
            f"| {r['name']} | {r['backbone']['name']} | {pre} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def _columns(m: dict[str, Any]) -> dict[str, float]:
    """Headline figures of a run given as run_eval's output (one checkpoint), a checkpoint
    entry, or a flat {metric: value} dict."""
    if "checkpoints" in m:
        if len(m["checkpoints"]) != 1:
            raise SeppError("an ablation run must hold the metrics of exactly one checkpoint")
        m = m["checkpoints"][0]
    if "headline" in m:
        return dict(m["headline"])
    if set(m) & {"knn", "linear", "semisup", "detection"}:
        return headline(m)
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}


def ablation_table(results: dict[str, dict[str, Any]], baseline: str) -> str:
    """Markdown: each run's figures and their change (percentage points) against ``baseline``.

    For robustness studies ("drop one augmentation", arXiv 2510.08722): the smaller the drops,
    the less the method depends on that augmentation.
    """
    if baseline not in results:
        raise SeppError(f"baseline {baseline!r} is not among the runs {sorted(results)}")
    cols_by_run = {name: _columns(m) for name, m in results.items()}
    base = cols_by_run[baseline]
    cols = [c for c in base if all(c in r for r in cols_by_run.values())]
    if not cols:
        raise SeppError("the runs share no metric with the baseline: evaluate them alike")
    lines = [
        "| run | " + " | ".join(cols) + " | mean change |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for name, r in cols_by_run.items():
        deltas = [100 * (r[c] - base[c]) for c in cols]
        if name == baseline:
            cells = [_pct(r[c]) for c in cols] + ["baseline"]
        else:
            cells = [f"{_pct(r[c])} ({d:+.2f})" for c, d in zip(cols, deltas, strict=True)]
            cells.append(f"{sum(deltas) / len(deltas):+.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
