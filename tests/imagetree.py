"""Builds small ImageFolder trees of real image files, good and bad, for ingest tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, fmt) if mode else Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def rgb(seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_tree(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: int = 3,
    splits: tuple[str, ...] | None = None,
) -> list[Path]:
    """Valid RGB images as root/[split/]class/NNN.{png,jpg}; returns the files written."""
    out: list[Path] = []
    for split in splits or (None,):
        for ci, cls in enumerate(classes):
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
                p = d / f"{i:03d}.{ext}"
                p.write_bytes(encode(rgb(1000 * ci + i + 100 * len(out)), fmt))
                out.append(p)
    return out


def write_bad_files(d: Path) -> dict[str, str]:
    """Problem files in folder ``d``; maps file name -> 'skip' or 'convert'."""
    d.mkdir(parents=True, exist_ok=True)
    good_jpeg = encode(rgb(7, 32), "JPEG")
    (d / "zero.png").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (d / "notes.txt").write_text("not an image")
    gray = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    (d / "gray.png").write_bytes(encode(gray, "PNG", "L"))
    rgba = np.random.default_rng(2).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    (d / "rgba.png").write_bytes(encode(rgba, "PNG", "RGBA"))
    deep = (np.random.default_rng(3).integers(0, 65536, (16, 16))).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, "PNG")
    (d / "deep16.png").write_bytes(buf.getvalue())
    return {
        "zero.png": "skip",
        "truncated.jpg": "skip",
        "corrupt.png": "skip",
        "notes.txt": "skip",
        "gray.png": "convert",
        "rgba.png": "convert",
        "deep16.png": "convert",
    }
