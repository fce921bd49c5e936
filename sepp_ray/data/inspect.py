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
        per = ", ".join(f"{k} {v}" for k, v in list(s["per_class"].items())[:10])
        lines.append(
            f"split      {split}: {s['total']} ({s['labeled']} labeled)"
            + (f"  [{per}{' ...' if len(s['per_class']) > 10 else ''}]" if per else "")
        )
    sk = m.get("skipped", {})
    lines.append(
        f"skipped    {sk.get('count', 0)}" + (f"  {sk.get('by_reason')}" if sk.get("count") else "")
    )
    for ex in sk.get("examples", [])[:5]:
        lines.append(f"           {ex['path']}: {ex['reason']}")
    if m.get("converted"):
        lines.append(f"converted  {m['converted']}")
    lines.append(f"shards     {len(m.get('files', []))}")
    return "\n".join(lines)


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
