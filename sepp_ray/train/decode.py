"""Decoding stored images for training, in the read tasks (or on the training device).

"full" passes images stored at the training size to the GPU, which crops them; "crop" takes each
view's random resized crop from the stored image on the CPU (any size and aspect ratio: nothing
is squashed first) and the GPU does the rest of the recipe; "eval" resizes the shorter side and
center-crops (the kNN monitor); "bytes" ships JPEG bytes for `decode_on_device` (nvJPEG).
Every mode gives each row's ``view_ids``: the image id behind view 1 and view 2, so no view of
an image is ever taken for a negative of the same image.

Rows are decoded straight into arrays allocated once per read task (`decode_parts`). Small JPEGs
(CIFAR, STL-10) decode in one batched call of the device path's JPEG decoder, here on the CPU:
at 32 px PIL spends about twice the decode itself parsing headers in Python. Pure functions of
a table and a seeded generator.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from sepp_ray.data.images import center_view
from sepp_ray.errors import SeppError

Batch = dict[str, np.ndarray]
DECODE_MODES = ("full", "crop", "eval", "bytes")
BATCHED_JPEG_SIDE = 96  # stored side up to which JPEGs decode in one batched call


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

    def row_bytes(self) -> int:
        """Decoded bytes of one row (what the buffer and the read-ahead are sized by)."""
        if self.mode == "bytes":
            return 64 * 1024  # a typical encoded image pair
        s1 = self.view1.size if self.mode == "crop" and self.view1 else self.size
        s2 = self.view2.size if self.mode == "crop" and self.view2 else self.size
        sl = self.local.size if self.mode == "crop" and self.local else 0
        return 3 * (s1 * s1 + (s2 * s2 if self.mode != "eval" else 0) + self.n_local * sl * sl)


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


def _batched_jpeg(blobs: list[bytes], out: np.ndarray) -> bool:
    """Decode small JPEGs in one torchvision call into ``out`` (m x S x S x 3); False when a
    blob is not a JPEG this decoder reads (PNG, CMYK, ...), so the caller falls back to PIL."""
    if not blobs or any(b[:2] != b"\xff\xd8" for b in blobs):
        return False
    import torch

    from sepp_ray.train.device_decode import jpeg_decoder  # the maintained decoder, on the CPU

    with warnings.catch_warnings():  # read-only bytes: the decoder only reads them
        warnings.simplefilter("ignore", UserWarning)
        data = [torch.frombuffer(b, dtype=torch.uint8) for b in blobs]
    try:
        imgs = jpeg_decoder()(data, mode="RGB", device=torch.device("cpu"))
    except RuntimeError:
        return False
    side = out.shape[1:3]
    if any(tuple(im.shape[1:]) != side for im in imgs):
        h, w = next(tuple(im.shape[1:]) for im in imgs if tuple(im.shape[1:]) != side)
        _full(Image.new("RGB", (w, h)), side[0])  # raises: sizes are not uniform
    torch.from_numpy(out).permute(0, 3, 1, 2).copy_(torch.stack(imgs))  # CHW -> HWC rows
    return True


def _full_into(blobs: list[bytes], out: np.ndarray, size: int) -> None:
    """Images stored at the training size -> ``out`` rows (one copy each)."""
    if size <= BATCHED_JPEG_SIDE and _batched_jpeg(blobs, out):
        return
    for i, blob in enumerate(blobs):
        out[i] = _full(_open(blob), size)


def view_ids(table: pa.Table) -> np.ndarray:
    """The image id behind each row's view 1 and view 2 (n x 2): [id, id] for an image row;
    for a pair item, its ``image_id`` and its ``image2_id`` (-1: the same image)."""
    cols = table.column_names
    if "item_id" not in cols:
        ids = table["id"].to_numpy().astype(np.int64)
        return np.stack([ids, ids], 1)
    if "image_id" not in cols or "image2_id" not in cols:
        raise SeppError(
            "the run's pair-item table predates image ids (no image_id / image2_id columns): "
            "rebuild it by running again with overwrite=true"
        )
    a = table["image_id"].to_numpy().astype(np.int64)
    b = table["image2_id"].fill_null(-1).to_numpy().astype(np.int64)
    return np.stack([a, np.where(b >= 0, b, a)], 1)


def positives(table: pa.Table, k: int) -> np.ndarray:
    """Each row's positive ids (n x k, -1 padded), from the ``pos_ids`` list column."""
    n = table.num_rows
    pos = np.full((n, k), -1, np.int64)
    if "pos_ids" not in table.column_names or n == 0:
        return pos
    col = table["pos_ids"]
    lens = pc.list_value_length(col).fill_null(0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(col).to_numpy().astype(np.int64)
    row = np.repeat(np.arange(n), lens)
    at = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    keep = at < k
    pos[row[keep], at[keep]] = flat[keep]
    return pos


def alloc(spec: DecodeSpec, n: int) -> Batch:
    """Empty output arrays for ``n`` rows decoded by ``spec``."""
    out: Batch = {
        "id": np.empty(n, np.int64),
        "label": np.empty(n, np.int64),
        "view_ids": np.empty((n, 2), np.int64),
    }
    if spec.mode == "bytes":
        out["image_bytes"] = np.empty(n, object)
        out["image2_bytes"] = np.empty(n, object)
    else:
        s1 = spec.view1.size if spec.mode == "crop" and spec.view1 else spec.size
        out["image"] = np.empty((n, s1, s1, 3), np.uint8)
    if spec.mode in ("full", "crop"):
        s2 = spec.view2.size if spec.mode == "crop" and spec.view2 else spec.size
        out["image2"] = np.empty((n, s2, s2, 3), np.uint8)
    if spec.mode == "crop" and spec.local is not None and spec.n_local:
        sl = spec.local.size
        out["local"] = np.empty((n, spec.n_local, sl, sl, 3), np.uint8)
    if spec.mode != "eval":
        out["pos_ids"] = np.empty((n, spec.max_positives), np.int64)
        out["group"] = np.empty(n, np.int64)
    return out


def _meta_into(out: Batch, rows: slice, table: pa.Table, spec: DecodeSpec) -> None:
    """Ids, labels, view ids, positives and groups of ``table``'s rows into ``out[rows]``."""
    cols = table.column_names
    n = table.num_rows
    out["id"][rows] = table["item_id" if "item_id" in cols else "id"].to_numpy()
    label = table["label"].fill_null(-1).to_numpy() if "label" in cols else -1
    out["label"][rows] = label
    out["view_ids"][rows] = view_ids(table)
    if spec.mode != "eval":
        out["pos_ids"][rows] = positives(table, spec.max_positives)
        out["group"][rows] = table["group"].to_numpy() if "group" in cols else np.full(n, -1)


def _crops_into(
    out: Batch, at: int, blobs: list[bytes], blobs2: list[Any], spec: DecodeSpec, rng: Any
) -> None:
    """Each view's random resized crop (and the local crops) of every row, drawn in row order."""
    assert spec.view1 is not None and spec.view2 is not None
    local = out.get("local")
    for i, (blob, blob2) in enumerate(zip(blobs, blobs2, strict=True)):
        img = _open(blob)
        img2 = _open(blob2) if blob2 is not None else img
        out["image"][at + i] = random_resized_crop(img, spec.view1, rng)
        out["image2"][at + i] = random_resized_crop(img2, spec.view2, rng)
        if local is not None and spec.local is not None:
            for j in range(spec.n_local):
                local[at + i, j] = random_resized_crop(img, spec.local, rng)


def _images_into(
    out: Batch, at: int, table: pa.Table, spec: DecodeSpec, rng: np.random.Generator
) -> None:
    """The image columns of ``table``'s rows into ``out`` from row ``at``, as ``spec`` says."""
    n = table.num_rows
    rows = slice(at, at + n)
    blobs = table["image"].to_pylist()
    blobs2: list[Any] = (
        table["image2"].to_pylist() if "image2" in table.column_names else [None] * n
    )
    if spec.mode == "bytes":  # decoded on the training device (`decode_on_device`)
        out["image_bytes"][rows] = np.array(blobs + [None], dtype=object)[:n]
        out["image2_bytes"][rows] = np.array(blobs2 + [None], dtype=object)[:n]
    elif spec.mode == "crop":
        _crops_into(out, at, blobs, blobs2, spec, rng)
    elif spec.mode == "eval":
        for i, blob in enumerate(blobs):
            out["image"][at + i] = center_view(_open(blob), spec.size)
    else:
        _full_into(blobs, out["image"][rows], spec.size)
        out["image2"][rows] = out["image"][rows]  # the image itself, unless a pair says other
        other = [i for i, b in enumerate(blobs2) if b is not None]
        if other:
            img2 = np.empty((len(other), *out["image2"].shape[1:]), np.uint8)
            _full_into([blobs2[i] for i in other], img2, spec.size)
            out["image2"][at + np.asarray(other)] = img2


def decode_parts(parts: list[tuple[pa.Table, np.random.Generator]], spec: DecodeSpec) -> Batch:
    """Several tables' rows -> one batch, each table's crops drawn from its own generator."""
    out = alloc(spec, sum(t.num_rows for t, _ in parts))
    at = 0
    for table, rng in parts:
        rows = slice(at, at + table.num_rows)
        _meta_into(out, rows, table, spec)
        _images_into(out, at, table, spec, rng)
        at += table.num_rows
    return out


def decode_rows(table: pa.Table, spec: DecodeSpec, rng: np.random.Generator) -> Batch:
    """Stored rows -> arrays: id, label, view_ids, image, image2 (and local crops), pos_ids,
    group ("eval": id, label, view_ids, image; "bytes": the encoded images instead)."""
    return decode_parts([(table, rng)], spec)


def decode_on_device(
    batch: Batch, device: Any, spec: DecodeSpec | None = None, generator: Any = None
) -> Any:
    """A "bytes" batch -> tensors on ``device``, its JPEGs decoded there (nvJPEG on CUDA):
    whole images, or each view's random resized crop when ``spec`` carries view crops. Returns
    a `device_decode.DeviceBatch` (a dict; ``cpu_decoded`` counts images PIL decoded)."""
    from sepp_ray.train.device_decode import decode_batch

    return decode_batch(batch, device, spec, generator)
