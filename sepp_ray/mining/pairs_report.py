"""`sepp pairs-report`: what a person looks at to judge mined pairs.

A grid of anchors with their positives (as in Fig. 5 of arXiv 2306.16122), the similarity
histogram with the thresholds marked, and, when labels exist, pair precision versus the lower
threshold. Written as PNGs plus a short Markdown page.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.data.images import decode_rgb
from sepp_ray.errors import SeppError
from sepp_ray.mining.report_stats import per_anchor_line
from sepp_ray.mining.tables import read_pairs
from sepp_ray.storage import filesystem, read_manifest


def _images_by_id(dataset_uri: str, ids: list[int]) -> dict[int, np.ndarray]:
    ds = ImageDataset.open(dataset_uri)
    fs, _ = filesystem(dataset_uri)
    wanted = set(ids)
    out: dict[int, np.ndarray] = {}
    import pyarrow as pa

    for path in ds.file_paths():
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=["id", "image"])
        t = t.filter(pc.is_in(t["id"], value_set=pa.array(sorted(wanted), pa.int64())))
        for i, blob in zip(t["id"].to_pylist(), t["image"].to_pylist(), strict=True):
            out[int(i)] = decode_rgb(blob)
        if len(out) == len(wanted):
            break
    return out


def pair_grid(
    pairs_uri: str, rows: int = 8, per_row: int = 4, cell: int = 64, seed: int = 0
) -> Image.Image:
    """Anchors (left column, boxed) and their positives with similarities, random anchors."""
    m = read_manifest(pairs_uri)
    t = read_pairs(pairs_uri)
    if t.num_rows == 0:
        raise SeppError(f"{pairs_uri} holds no pairs: nothing to show (see its manifest warning)")
    anchors = np.unique(t["anchor_id"].to_numpy())
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(anchors, size=min(rows, len(anchors)), replace=False))
    sub = t.filter(pc.is_in(t["anchor_id"], value_set=__import__("pyarrow").array(chosen)))
    a_ids = sub["anchor_id"].to_numpy()
    p_ids = sub["positive_id"].to_numpy()
    sims = sub["similarity"].to_numpy()
    imgs = _images_by_id(m["dataset"]["uri"], sorted(set(a_ids.tolist()) | set(p_ids.tolist())))
    grid = Image.new("RGB", ((per_row + 1) * (cell + 6) + 6, len(chosen) * (cell + 18)), "white")
    draw = ImageDraw.Draw(grid)
    for r, a in enumerate(chosen):
        y = r * (cell + 18)
        grid.paste(Image.fromarray(imgs[int(a)]).resize((cell, cell)), (3, y))
        draw.rectangle((1, y - 1, cell + 4, y + cell + 1), outline="red", width=2)
        draw.text((3, y + cell + 2), "anchor", fill="red")
        sel = np.flatnonzero(a_ids == a)[:per_row]
        for c, j in enumerate(sel):
            x = (c + 1) * (cell + 6) + 6
            grid.paste(Image.fromarray(imgs[int(p_ids[j])]).resize((cell, cell)), (x, y))
            draw.text((x, y + cell + 2), f"{sims[j]:.3f}", fill="black")
    return grid


def _save_fig(fig: Any, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _put(uri, buf.getvalue())


def _put(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def histogram_figure(m: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = m["similarity_histogram"]
    edges = np.asarray(h["edges"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.stairs(
        h["nearest_neighbour"],
        edges,
        fill=True,
        alpha=0.5,
        label="nearest neighbour of each anchor (below hi)",
    )
    ax.stairs(h["pairs"], edges, fill=True, alpha=0.7, label="accepted pairs")
    for x, name in ((m["lo"], "lo"), (m["hi"], "hi")):
        ax.axvline(x, color="red", linestyle="--")
        ax.text(x, ax.get_ylim()[1] * 0.95, f" {name}={x}", color="red", fontsize=8)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("count")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def precision_figure(m: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [r for r in m["threshold_curve"] if r.get("precision") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["lo"] for r in curve], [r["precision"] for r in curve], marker="o")
    ax.axvline(m["lo"], color="red", linestyle="--")
    ax.set_xlabel("lower threshold lo")
    ax.set_ylabel("pair precision (same label)")
    ax2 = ax.twinx()
    ax2.plot(
        [r["lo"] for r in curve],
        [r["anchors_with_positive"] for r in curve],
        color="gray",
        alpha=0.6,
    )
    ax2.set_ylabel("anchors with a positive", color="gray")
    fig.tight_layout()
    return fig


def per_anchor_table(m: dict[str, Any]) -> list[str]:
    """The distribution of positives per anchor as a Markdown table (anchors per bin)."""
    hist = m["positives_per_anchor"]["histogram"]
    return [
        "",
        "| positives per anchor | " + " | ".join(hist) + " |",
        "|---" * (len(hist) + 1) + "|",
        "| anchors | " + " | ".join(str(v) for v in hist.values()) + " |",
    ]


def write_report(pairs_uri: str, out_uri: str, rows: int = 8, per_row: int = 4) -> list[str]:
    """Write the PNGs and report.md under ``out_uri``; returns the files written."""
    m = read_manifest(pairs_uri)
    if m.get("kind") != "pairs":
        raise SeppError(f"{pairs_uri} is a {m.get('kind')!r} output, not mined pairs")
    base = out_uri.rstrip("/")
    written = []
    if m["num_pairs"]:
        buf = io.BytesIO()
        pair_grid(pairs_uri, rows=rows, per_row=per_row).save(buf, "PNG")
        _put(f"{base}/pairs_grid.png", buf.getvalue())
        written.append(f"{base}/pairs_grid.png")
    _save_fig(histogram_figure(m), f"{base}/similarity_histogram.png")
    written.append(f"{base}/similarity_histogram.png")
    if m.get("precision"):
        _save_fig(precision_figure(m), f"{base}/precision_vs_threshold.png")
        written.append(f"{base}/precision_vs_threshold.png")
    lines = [
        f"# Pairs report: {pairs_uri}",
        "",
        f"- encoder: `{m['encoder']['identity']}`",
        f"- N = {m['n']}, K = {m['k']} anchors, thresholds [{m['lo']}, {m['hi']}], "
        f"m = {m['config']['m']}",
        f"- pairs: {m['num_pairs']}; anchors with a positive: {m['anchors_with_positive']}",
    ]
    if "median" in m.get("positives_per_anchor", {}):  # recorded since the distribution was
        lines += [f"- {per_anchor_line(m)}", *per_anchor_table(m)]
    if m.get("precision"):
        lines.append(f"- pair precision: {m['precision']['overall']}")
        lines += ["", "| lo | pairs | anchors with a positive | precision |", "|---|---|---|---|"]
        lines += [
            f"| {r['lo']} | {r['pairs']} | {r['anchors_with_positive']} | {r.get('precision')} |"
            for r in m["threshold_curve"]
        ]
    if m.get("warning"):
        lines += ["", f"**Warning:** {m['warning']}"]
    lines += [""] + [f"![]({w.rsplit('/', 1)[1]})" for w in written]
    _put(f"{base}/report.md", "\n".join(lines).encode())
    written.append(f"{base}/report.md")
    return written
