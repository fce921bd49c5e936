"""`sepp inspect`: a readable summary of a dataset's manifest and a PNG grid of samples."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.data.images import decode_rgb
from sepp_ray.storage import filesystem


def summary_text(uri: str, m: dict[str, Any]) -> str:
    """The manifest as a few human lines."""
    lines = [
        f"dataset    {uri}",
        f"source     {m.get('source', {}).get('kind')}  "
        f"(fingerprint {str(m.get('source', {}).get('fingerprint'))[:12]})",
        f"images     {m['num_images']}",
    ]
    size = m.get("image_size", {})
    if size:
        w, h = size["width"], size["height"]
        shown = f"{w[0]}x{h[0]}" if size.get("uniform") else f"{w[0]}-{w[1]} x {h[0]}-{h[1]}"
        lines.append(f"size       {shown}")
    classes = m.get("classes", [])
    lines.append(
        f"classes    {len(classes)}: {', '.join(classes[:12])}"
        + (" ..." if len(classes) > 12 else "")
    )
    for split, s in m.get("splits", {}).items():
        lines.append(f"split      {split}: {s['total']} ({s['labeled']} labeled)")
    lines += class_table(m)
    sk = m.get("skipped", {})
    lines.append(
        f"skipped    {sk.get('count', 0)}" + (f"  {sk.get('by_reason')}" if sk.get("count") else "")
    )
    for ex in sk.get("examples", [])[:5]:
        lines.append(f"           {ex['path']}: {ex['reason']}")
    for flag in anomalies(m):
        lines.append(f"WARNING    {flag}")
    if m.get("converted"):
        lines.append(f"converted  {m['converted']}")
    lines.append(f"shards     {len(m.get('files', []))}")
    return "\n".join(lines)


def class_table(m: dict[str, Any], max_rows: int = 20) -> list[str]:
    """Per-class image counts with the splits side by side: a class missing from a split, or
    one split's lone class, shows at a glance."""
    splits = {k: v["per_class"] for k, v in m.get("splits", {}).items()}
    classes = m.get("classes", [])
    if not classes or not splits:
        return []
    width = max(len(c) for c in classes[:max_rows] + ["class"])
    names = list(splits)
    cols = [max(len(n), 6) for n in names]
    head = f"  {'class':<{width}}  " + "  ".join(
        f"{n:>{w}}" for n, w in zip(names, cols, strict=True)
    )
    rows = [head]
    for c in classes[:max_rows]:
        cells = [f"{splits[n].get(c, 0) or '-':>{w}}" for n, w in zip(names, cols, strict=True)]
        rows.append(f"  {c:<{width}}  " + "  ".join(cells))
    if len(classes) > max_rows:
        rows.append(f"  ... {len(classes) - max_rows} more classes (--json shows all)")
    return ["per class"] + rows


def anomalies(m: dict[str, Any]) -> list[str]:
    """What may mean the source was misread: the layout checks of ImageFolder ingest run on
    the stored counts, plus non-image files that were skipped."""
    from collections import Counter

    from sepp_ray.data.sources.labels import SplitLayout, layout_problems

    splits = {
        name: SplitLayout(
            name,
            images=s["total"],
            classes=Counter(s["per_class"]),
            unlabeled=s["total"] - s["labeled"],
        )
        for name, s in m.get("splits", {}).items()
    }
    problems, warnings = layout_problems(splits)
    sk = m.get("skipped", {})
    odd = Counter(
        e["reason"].split(": ", 1)[1]
        for e in sk.get("examples", [])
        if e["reason"].startswith("not an image file")
    )
    if odd:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(odd.items()))
        warnings.append(f"non-image files were skipped (among the listed examples: {kinds})")
    return problems + warnings


def sample_grid(
    ds: ImageDataset, per_class: int = 8, max_classes: int = 10, cell: int = 64, limit: int = 5000
) -> Image.Image:
    """A grid: one row per class (first ``per_class`` images of it), class name on the left.
    Unlabeled data gives rows of ``per_class`` images in storage order."""
    table = ds.read_table(["image", "label"], limit=limit)
    labels = np.asarray(table["label"].to_numpy(zero_copy_only=False), dtype=float)
    images = table["image"].to_pylist()
    classes = ds.classes
    rows: list[tuple[str, list[bytes]]] = []
    for c, name in enumerate(classes[:max_classes]):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx):
            rows.append((name, [images[i] for i in idx]))
    if not rows:
        for r in range(min(max_classes, (len(images) + per_class - 1) // per_class)):
            rows.append(("", images[r * per_class : (r + 1) * per_class]))
    margin = 90
    grid = Image.new("RGB", (margin + per_class * (cell + 2), len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, blobs) in enumerate(rows):
        y = r * (cell + 2)
        draw.text((4, y + cell // 2 - 6), name[:14], fill="black")
        for c, blob in enumerate(blobs):
            img = Image.fromarray(decode_rgb(blob)).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(img, (margin + c * (cell + 2), y))
    return grid


def save_png(img: Image.Image, uri: str) -> None:
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
