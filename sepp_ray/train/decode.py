"""Decoding stored images for training, in the read tasks (or on the training device).

"full" passes images stored at the training size to the GPU, which crops them; "crop" takes each
view's random resized crop from the stored image on the CPU (any size and aspect ratio: nothing
is squashed first) and the GPU does the rest of the recipe; "eval" resizes the shorter side and
center-crops (the kNN monitor); "bytes" ships JPEG bytes for `decode_on_device` (nvJPEG).
Pure functions of a table and a seeded generator.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from sepp_ray.data.images import center_view
from sepp_ray.errors import SeppError

Batch = dict[str, np.ndarray]
DECODE_MODES = ("full", "crop", "eval", "bytes")


@dataclass(frozen=True)
class CropSpec:
    """One view's random resized crop (torchvision's RandomResizedCrop parameters)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class DecodeSpec:
    """How a task turns stored images into arrays; see the module docstring for the modes."""

    mode: str
    size: int  # "full"/"eval": the output side; "crop": unused (each view has its own)
    view1: CropSpec | None = None
    view2: CropSpec | None = None
    local: CropSpec | None = None
    n_local: int = 0
    max_positives: int = 1
    split: str | None = None  # image shards: the training split
    exclude: Any = None  # sorted ids (or an ObjectRef of them) that train from the item table
    columns: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            raise SeppError(f"decode mode must be one of {DECODE_MODES}, got {self.mode!r}")
        if self.mode == "crop" and (self.view1 is None or self.view2 is None):
            raise SeppError("crop decoding needs the two views' crop specs")


def _open(blob: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(blob))
    return img.convert("RGB") if img.mode != "RGB" else img


def crop_box(
    w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, width, height): 10 tries, then the central fallback."""
    area = w * h
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        cw, ch = int(round(h * max(ratio))), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def random_resized_crop(img: Image.Image, spec: CropSpec, rng: np.random.Generator) -> np.ndarray:
    left, top, cw, ch = crop_box(img.width, img.height, spec.scale, spec.ratio, rng)
    out = img.resize(
        (spec.size, spec.size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch)
    )
    return np.asarray(out)


def _full(img: Image.Image, size: int) -> np.ndarray:
    if img.size != (size, size):
        raise SeppError(
            f"an image of {img.size[0]}x{img.size[1]} in a dataset decoded at its stored size "
            f"{size}x{size}: the dataset's sizes are not uniform; train with crop decoding"
        )
    return np.asarray(img)


def _stack(arrays: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)


def decode_rows(table: pa.Table, spec: DecodeSpec, rng: np.random.Generator) -> Batch:
    """Stored rows -> arrays: id, label, image, image2 (and local crops), pos_ids, group."""
    n = table.num_rows
    cols = table.column_names
    ids = table["item_id" if "item_id" in cols else "id"].to_numpy().astype(np.int64)
    labels = (
        table["label"].fill_null(-1).to_numpy().astype(np.int64)
        if "label" in cols
        else np.full(n, -1, np.int64)
    )
    blobs = table["image"].to_pylist()
    blobs2 = table["image2"].to_pylist() if "image2" in cols else [None] * n
    if spec.mode == "bytes":  # decoded on the training device (`decode_on_device`)
        out_b: Batch = {"id": ids, "label": labels}
        out_b["image_bytes"] = np.array(blobs + [None], dtype=object)[:n]
        out_b["image2_bytes"] = np.array(blobs2 + [None], dtype=object)[:n]
        return {**out_b, **_extras(table, spec, n)}
    v1: list[np.ndarray] = []
    v2: list[np.ndarray] = []
    local: list[np.ndarray] = []
    for blob, blob2 in zip(blobs, blobs2, strict=True):
        img = _open(blob)
        img2 = _open(blob2) if blob2 is not None else img
        if spec.mode == "crop":
            assert spec.view1 is not None and spec.view2 is not None
            v1.append(random_resized_crop(img, spec.view1, rng))
            v2.append(random_resized_crop(img2, spec.view2, rng))
            if spec.local is not None:
                local.extend(random_resized_crop(img, spec.local, rng) for _ in range(spec.n_local))
        elif spec.mode == "eval":
            v1.append(center_view(img, spec.size))
        else:
            a = _full(img, spec.size)
            v1.append(a)
            v2.append(_full(img2, spec.size) if blob2 is not None else a)
    s1 = spec.view1.size if spec.mode == "crop" and spec.view1 else spec.size
    out: Batch = {"id": ids, "label": labels, "image": _stack(v1, s1)}
    if spec.mode == "eval":
        return out
    s2 = spec.view2.size if spec.mode == "crop" and spec.view2 else spec.size
    out["image2"] = _stack(v2, s2)
    if spec.local is not None and spec.n_local and spec.mode == "crop":
        sl = spec.local.size
        out["local"] = (
            np.stack(local).reshape(n, spec.n_local, sl, sl, 3)
            if n
            else np.zeros((0, spec.n_local, sl, sl, 3), np.uint8)
        )
    return {**out, **_extras(table, spec, n)}


def _extras(table: pa.Table, spec: DecodeSpec, n: int) -> Batch:
    """pos_ids (n x max_positives, -1 padded) and group of every row."""
    cols = table.column_names
    pos = np.full((n, spec.max_positives), -1, np.int64)
    if "pos_ids" in cols:
        for i, lst in enumerate(table["pos_ids"].to_pylist()):
            lst = (lst or [])[: spec.max_positives]
            pos[i, : len(lst)] = lst
    group = (
        table["group"].to_numpy().astype(np.int64) if "group" in cols else np.full(n, -1, np.int64)
    )
    return {"pos_ids": pos, "group": group}


def decode_on_device(batch: Batch, device: Any) -> dict[str, Any]:
    """A "bytes" batch -> tensors on ``device``, its JPEGs decoded there (nvJPEG on CUDA, via
    torchvision.io.decode_jpeg); image2 decoded only where it differs from image."""
    import torch
    from torchvision.io import decode_jpeg

    def decode(blobs: list[bytes]) -> Any:
        if any(b[:2] != b"\xff\xd8" for b in blobs):
            raise SeppError(
                "decode_on=gpu needs JPEG shards: ingest with images.encoding=jpeg, or decode "
                "on the CPU (decode_on=cpu)"
            )
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        return torch.stack(decode_jpeg(data, device=device)).permute(0, 2, 3, 1)  # B x H x W x 3

    out: dict[str, Any] = {
        k: torch.from_numpy(v).to(device, non_blocking=True)
        for k, v in batch.items()
        if k not in ("image_bytes", "image2_bytes")
    }
    image = decode(list(batch["image_bytes"]))
    image2 = image.clone()
    other = [i for i, b in enumerate(batch["image2_bytes"]) if b is not None]
    if other:
        image2[other] = decode([batch["image2_bytes"][i] for i in other])
    out["image"], out["image2"] = image, image2
    return out
