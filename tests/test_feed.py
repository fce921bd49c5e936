"""The pure parts of the data plane: epoch plans, decoding modes, the shuffle buffer (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sepp_ray.errors import SeppError
from sepp_ray.train.decode import CropSpec, DecodeSpec, crop_box, decode_on_device, decode_rows
from sepp_ray.train.feed import ShuffleBuffer, pack, units_of
from sepp_ray.train.plan import Chunk, rank_slices
from tests.imagetree import encode, rgb


def _chunks() -> list[Chunk]:
    return [Chunk(f"f{i}", 0, 10 + i, "images") for i in range(12)] + [
        Chunk(f"p{i}", 0, 7, "items") for i in range(4)
    ]


def test_rank_slices_are_disjoint_cover_their_share_and_change_per_epoch() -> None:
    chunks = _chunks()
    for world in (1, 2, 3):
        per_rank = (sum(c.rows for c in chunks) // (world * 8)) * 8
        rows = set()
        for r in range(world):
            parts = rank_slices(chunks, 0, 0, world, r, per_rank)
            assert sum(p.rows for p in parts) == per_rank
            for p in parts:
                mine = {(p.chunk.uri, i) for i in range(p.start, p.stop)}
                assert not rows & mine
                rows |= mine
    a = rank_slices(chunks, 0, 0, 2, 0, 64)
    assert a == rank_slices(chunks, 0, 0, 2, 0, 64)  # a pure function of (seed, epoch)
    assert a != rank_slices(chunks, 0, 1, 2, 0, 64)
    with pytest.raises(SeppError, match="exceed"):
        rank_slices(chunks, 0, 0, 2, 0, 10_000)


def test_crop_box_follows_random_resized_crop() -> None:
    rng = np.random.default_rng(0)
    for w, h in ((256, 341), (500, 100), (32, 32)):
        for _ in range(200):
            left, top, cw, ch = crop_box(w, h, (0.08, 1.0), (3 / 4, 4 / 3), rng)
            assert 0 <= left <= w - cw and 0 <= top <= h - ch and cw > 0 and ch > 0
            assert cw * ch <= w * h
    # no valid try: torchvision's fallback, the central crop clamped to the ratio range
    assert crop_box(1000, 10, (0.99, 1.0), (1.0, 1.0), rng) == (495, 0, 10, 10)


def _table(n: int = 4, size: int = 32, fmt: str = "PNG") -> pa.Table:
    blobs = [encode(rgb(i, size), fmt) for i in range(n)]
    return pa.table(
        {
            "item_id": pa.array(range(n), pa.int64()),
            "image": blobs,
            "image2": [None, blobs[0], None, None][:n],
            "label": pa.array([1, None, 2, 3][:n], pa.int32()),
            "group": pa.array([-1, 5, 5, -1][:n], pa.int64()),
            "pos_ids": [[], [2], [1], []][:n],
        }
    )


def test_decode_modes() -> None:
    rng = np.random.default_rng(0)
    t = _table()
    full = decode_rows(t, DecodeSpec("full", 32, max_positives=2), rng)
    assert full["image"].shape == (4, 32, 32, 3) and full["label"].tolist() == [1, -1, 2, 3]
    np.testing.assert_array_equal(full["image2"][1], full["image"][0])  # image2 = the positive
    np.testing.assert_array_equal(full["image2"][2], full["image"][2])  # null = the image itself
    assert full["pos_ids"].tolist() == [[-1, -1], [2, -1], [1, -1], [-1, -1]]
    crop = DecodeSpec(
        "crop", 24, view1=CropSpec(24), view2=CropSpec(16), local=CropSpec(8), n_local=2
    )
    c = decode_rows(t, crop, rng)
    assert c["image"].shape == (4, 24, 24, 3) and c["image2"].shape == (4, 16, 16, 3)
    assert c["local"].shape == (4, 2, 8, 8, 3)
    ev = decode_rows(_table(size=40), DecodeSpec("eval", 32), rng)
    assert ev["image"].shape == (4, 32, 32, 3) and "image2" not in ev
    with pytest.raises(SeppError, match="not uniform"):
        decode_rows(_table(size=40), DecodeSpec("full", 32), rng)


def test_jpeg_bytes_decode_on_the_device_as_on_the_cpu() -> None:
    t = _table(fmt="JPEG")
    rng = np.random.default_rng(0)
    raw = decode_rows(t, DecodeSpec("bytes", 32), rng)
    on_dev = decode_on_device(raw, "cpu")  # the CUDA path is the same call on a GPU
    cpu = decode_rows(t, DecodeSpec("full", 32), rng)
    assert on_dev["image"].shape == (4, 32, 32, 3)
    diff = np.abs(on_dev["image"].numpy().astype(int) - cpu["image"].astype(int))
    assert diff.max() <= 2  # two libjpeg builds may round an IDCT differently
    np.testing.assert_array_equal(on_dev["image2"][1].numpy(), on_dev["image"][0].numpy())
    with pytest.raises(SeppError, match="needs JPEG shards"):
        decode_on_device(decode_rows(_table(), DecodeSpec("bytes", 32), rng), "cpu")


def test_pack_keeps_groups_whole_while_singles_fill_the_gaps() -> None:
    group = np.array([-1, 3, 3, 3, -1, -1, 4, 4, -1, -1, -1, -1, 9, 9, 9, 9])
    units = units_of(group)
    assert [len(u) for u in units] == [1, 3, 1, 1, 2, 1, 1, 1, 1, 4]
    batches, rest = pack(units, 4, 3)
    assert all(len(b) == 4 for b in batches) and len(rest) == 4
    for b in batches:
        for g in (3, 4, 9):
            members = set(np.flatnonzero(group == g).tolist())
            assert not members & set(b.tolist()) or members <= set(b.tolist())


def test_shuffle_buffer_is_seeded_and_loses_no_row() -> None:
    def run(seed: int) -> list[list[int]]:
        buf = ShuffleBuffer(8, 16, np.random.default_rng(seed))
        out = []
        for k in range(6):
            block = {"id": np.arange(k * 8, k * 8 + 8), "group": np.full(8, -1)}
            out += [b["id"].tolist() for b in buf.push(block)]
        out += [b["id"].tolist() for b in buf.flush()]
        return out

    a = run(0)
    assert sorted(x for b in a for x in b) == list(range(48)) and all(len(b) == 8 for b in a)
    assert a == run(0) and a != run(1)
