"""Decode, validate, convert and encode one image; pure functions used inside ingest.

The stored form is always 8-bit RGB, encoded as PNG or JPEG. What can be converted soundly is
converted (grayscale, palette, RGBA, CMYK, 16-bit); what cannot be decoded is skipped with a
reason that ends up in the manifest.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from sepp_ray.data.sources.base import Payload

# PIL refuses decompression bombs only above this many pixels; 16k x 16k is plenty for SSL data.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


@dataclass(frozen=True)
class Processed:
    """An image ready to store, or the reason it was skipped."""

    data: bytes | None  # encoded RGB image; None when skipped
    width: int = 0
    height: int = 0
    converted_from: str | None = None  # original mode when a conversion happened
    skip_reason: str | None = None


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: keep the top 8 bits of the 16-bit range (sound for 16-bit data).
        arr = np.asarray(img, dtype=np.uint32 if mode == "I" else np.uint16).astype(np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 or mode != "I" else 255.0
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB"), "16bit"
    if mode == "F":
        return img.convert("L").convert("RGB"), "float"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite on white: transparent pixels must not turn black (a new, dark "content").
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB"), "alpha"
    if mode in ("L", "1"):
        return img.convert("RGB"), "grayscale"
    return img.convert("RGB"), mode.lower()


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise ValueError(f"unsupported array dtype {arr.dtype}")
    if arr.ndim == 2:
        return Image.fromarray(arr, "L")
    if arr.ndim == 3 and arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], "L")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[2] == 3 else "RGBA")
    raise ValueError(f"unsupported array shape {arr.shape}")


def resize_shorter(img: Image.Image, size: int, center_crop: bool) -> Image.Image:
    """Resize so the shorter side is ``size`` (antialiased), optionally center-crop a square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
    if center_crop and (nw, nh) != (size, size):
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def process(
    payload: Payload,
    *,
    resize: int | None = None,
    center_crop: bool = False,
    encoding: str = "keep",
    jpeg_quality: int = 95,
    min_size: int = 1,
) -> Processed:
    """Decode and validate a payload; return stored bytes or a skip reason.

    ``encoding``: "keep" stores original JPEG/PNG bytes untouched when no conversion or resize
    was needed (lossless and fastest); a resized or converted JPEG is re-encoded as JPEG at
    ``jpeg_quality`` (a PNG of a photo is several times larger), anything else as PNG; "png" or
    "jpeg" always re-encode.
    """
    converted: str | None = None
    original_format: str | None = None
    try:
        if isinstance(payload, np.ndarray):
            img = _from_array(payload)
        else:
            if len(payload) == 0:
                return Processed(None, skip_reason="empty file (0 bytes)")
            img = Image.open(io.BytesIO(payload))
            original_format = img.format
            img.load()  # forces a full decode: truncated or corrupt data fails here
        if img.mode != "RGB":
            img, converted = _to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return Processed(None, skip_reason=f"cannot decode: {type(e).__name__}: {e}")
    except Image.DecompressionBombError as e:
        return Processed(None, skip_reason=f"too large: {e}")
    if min(img.size) < min_size:
        return Processed(None, skip_reason=f"too small: {img.size[0]}x{img.size[1]} < {min_size}")
    resized = False
    if resize:
        new = resize_shorter(img, resize, center_crop)
        resized = new.size != img.size
        img = new
    keep = (
        encoding == "keep"
        and isinstance(payload, bytes)
        and original_format in ("JPEG", "PNG")
        and converted is None
        and not resized
    )
    if keep:
        data = bytes(payload)  # type: ignore[arg-type]
    else:
        lossy_source = encoding == "keep" and original_format == "JPEG"
        fmt = "JPEG" if encoding == "jpeg" or lossy_source else "PNG"
        buf = io.BytesIO()
        if fmt == "JPEG":
            img.save(buf, fmt, quality=jpeg_quality)
        else:
            img.save(buf, fmt, compress_level=1)  # fast: shards are compressed again by Parquet
        data = buf.getvalue()
    return Processed(data, width=img.size[0], height=img.size[1], converted_from=converted)


def decode_rgb(data: bytes, size: int | None = None) -> np.ndarray:
    """Stored bytes -> H x W x 3 uint8 array; with ``size``, the evaluation view: shorter side
    to ``size`` (bicubic), then the central size x size square (`center_view`), as the usual
    linear-evaluation protocol and training's kNN monitor see an image (aspect ratio kept)."""
    with Image.open(io.BytesIO(data)) as f:
        img = f.convert("RGB")
        return center_view(img, size) if size is not None else np.asarray(img)


def center_view(img: Image.Image, size: int) -> np.ndarray:
    """The evaluation view of a decoded image: shorter side to ``size``, the central square."""
    if img.size != (size, size):
        img = resize_shorter(img, size, center_crop=True)
    return np.asarray(img)


PIXELS = "pixels"  # decoded images: fixed-size binary of size x size x 3 uint8 (HWC)


class DecodeImages:
    """A pure batch function for a CPU stage ahead of GPU actors: the ``image`` column (encoded
    bytes) -> ``pixels`` (decoded, ``size`` x ``size``), so the actors only run the model."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.__name__ = "decode_images"  # Ray Data names a map by its function

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        n = self.size * self.size * 3
        raw = b"".join(decode_rgb(b, self.size).tobytes() for b in batch["image"].to_pylist())
        pixels = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(n), batch.num_rows, [None, pa.py_buffer(raw)]
        )
        return batch.drop_columns(["image"]).append_column(PIXELS, pixels)


def batch_pixels(batch: Any, size: int) -> np.ndarray:
    """B x size x size x 3 uint8 of a batch: its decoded ``pixels`` when a decode stage ran,
    else its ``image`` bytes decoded here."""
    if PIXELS in batch.column_names:
        col = batch[PIXELS].combine_chunks()
        buf = np.frombuffer(col.buffers()[1], np.uint8)
        start = col.offset * size * size * 3
        return buf[start : start + len(col) * size * size * 3].reshape(len(col), size, size, 3)
    blobs = batch["image"].to_pylist()
    out = np.empty((len(blobs), size, size, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        out[i] = decode_rgb(blob, size)
    return out
