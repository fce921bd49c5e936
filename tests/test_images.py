"""Decoding, conversion and skipping of single images (pure functions, no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sepp_ray.data.images import decode_rgb, process
from tests.imagetree import encode, rgb


def test_rgb_png_kept_byte_for_byte() -> None:
    data = encode(rgb(0), "PNG")
    out = process(data)
    assert out.data == data and out.converted_from is None
    assert (out.width, out.height) == (16, 16)


def test_array_payload_encoded_losslessly() -> None:
    arr = rgb(1, 20)
    out = process(arr)
    assert out.data is not None
    np.testing.assert_array_equal(decode_rgb(out.data), arr)


@pytest.mark.parametrize("mode,kind", [("L", "grayscale"), ("RGBA", "alpha"), ("P", "p")])
def test_non_rgb_modes_are_converted(mode: str, kind: str) -> None:
    base = Image.fromarray(rgb(2))
    img = base.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = process(buf.getvalue())
    assert out.data is not None and out.converted_from == kind
    assert decode_rgb(out.data).shape == (16, 16, 3)


def test_16bit_keeps_the_top_8_bits() -> None:
    deep = np.array([[0, 256, 65535, 32768]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, "PNG")
    out = process(buf.getvalue())
    assert out.converted_from == "16bit" and out.data is not None
    np.testing.assert_array_equal(decode_rgb(out.data)[0, :, 0], [0, 1, 255, 128])


def test_transparent_pixels_become_white_not_black() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    out = process(encode(rgba, "PNG", "RGBA"))
    assert out.data is not None
    assert decode_rgb(out.data).min() == 255


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"", "empty file"),
        (b"\x89PNG\r\n\x1a\n" + b"x" * 50, "cannot decode"),
        (encode(rgb(3, 64), "JPEG")[:300], "cannot decode"),
        (b"hello world", "cannot decode"),
    ],
)
def test_bad_bytes_are_skipped_with_a_reason(payload: bytes, reason: str) -> None:
    out = process(payload)
    assert out.data is None
    assert out.skip_reason is not None and out.skip_reason.startswith(reason)


def test_resize_shorter_side_and_center_crop() -> None:
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    out = process(encode(arr), resize=20)
    assert (out.width, out.height) == (40, 20)
    out = process(encode(arr), resize=20, center_crop=True)
    assert (out.width, out.height) == (20, 20)
    assert decode_rgb(out.data or b"").shape == (20, 20, 3)


def test_min_size_and_jpeg_encoding() -> None:
    assert process(rgb(4, 8), min_size=16).skip_reason == "too small: 8x8 < 16"
    out = process(rgb(4, 8), encoding="jpeg")
    assert out.data is not None and out.data[:2] == b"\xff\xd8"


def test_the_decode_stage_hands_actors_the_same_pixels_as_decoding_in_place() -> None:
    import pyarrow as pa

    from sepp_ray.data.images import PIXELS, DecodeImages, batch_pixels

    blobs = [encode(rgb(i, 12)) for i in range(5)]
    batch = pa.table({"id": list(range(5)), "image": blobs})
    staged = DecodeImages(8)(batch)
    assert PIXELS in staged.column_names and "image" not in staged.column_names
    np.testing.assert_array_equal(batch_pixels(staged, 8), batch_pixels(batch, 8))
    assert batch_pixels(staged.slice(2, 2), 8).shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(batch_pixels(staged.slice(2, 2), 8), batch_pixels(batch, 8)[2:4])


def test_the_evaluation_view_keeps_the_aspect_ratio_as_the_monitor_does() -> None:
    """Embedding, evaluation and training's kNN monitor decode one way: shorter side to S,
    then the central square (never a squash of a non-square image)."""
    import pyarrow as pa

    from sepp_ray.train.decode import DecodeSpec, decode_rows

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = 255  # a white square in the middle of a black 40x20 image
    blob = encode(arr, "PNG")
    view = decode_rgb(blob, 10)
    assert view.shape == (10, 10, 3) and view.min() > 200  # the centre, not a squashed image
    table = pa.table({"id": [7], "label": [0], "image": [blob]})
    monitor = decode_rows(table, DecodeSpec(mode="eval", size=10), np.random.default_rng(0))
    np.testing.assert_array_equal(monitor["image"][0], view)
