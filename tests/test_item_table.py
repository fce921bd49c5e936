"""The item table at any pair count: arrays cut by bytes (an Arrow binary array stops at 2 GiB),
an image named by many pairs routed once per partition, the table's size said and refused past
its bound, and the image ids of both views stored. Pure functions first, then builds on the
session's cluster (the 800,000-pair one is slow: it writes 2.5 GB)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem
from sepp_ray.train import dataplane
from sepp_ray.train.item_table import (
    ItemEstimate,
    _Route,
    byte_pieces,
    check_size,
    estimate,
    write_item_table,
)
from sepp_ray.train.items import PairsConfig, plan_items


def _pairs(a: np.ndarray, p: np.ndarray) -> pa.Table:
    return pa.table({"anchor_id": pa.array(a, pa.int64()), "positive_id": pa.array(p, pa.int64())})


def _shard(path: Path, ids: np.ndarray, images: list[bytes], row_group: int = 4096) -> str:
    t = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "image": pa.array(images, pa.binary()),
            "label": pa.array(ids % 7, pa.int32()),
            "split": ["train"] * len(ids),
        }
    )
    pq.write_table(t, path, row_group_size=row_group)
    return str(path)


def test_byte_pieces_cover_the_rows_in_runs_under_the_budget() -> None:
    sizes = np.random.default_rng(0).integers(1, 100, 1000)
    for step in (1, 7):
        pieces = byte_pieces(sizes, 500, step)
        assert pieces[0][0] == 0 and pieces[-1][1] == 1000
        assert all(b == c for (_, b), (c, _) in zip(pieces, pieces[1:], strict=False))
        for a, b in pieces:
            assert a % step == 0 and (b % step == 0 or b == 1000)
            assert sizes[a:b].sum() <= 500 or b - a <= step  # one step of rows may pass it
            if b < 1000:  # greedy: one more step of rows would pass the budget
                assert sizes[a : min(b + step, 1000)].sum() > 500
    # a single row larger than the budget still gets a piece of its own
    assert byte_pieces(np.array([10, 900, 10]), 100) == [(0, 1), (1, 2), (2, 3)]
    assert byte_pieces(np.array([], np.int64), 100) == []


def test_a_hub_image_is_routed_once_per_partition_in_pieces_by_bytes() -> None:
    hub, others = 0, np.arange(1, 3001)
    plan = plan_items(
        _pairs(np.full(3000, hub), others), None, PairsConfig(pairs="x", mode="dataset")
    )
    ids = np.arange(0, 3001)
    images = [b"h" * 5000] + [bytes([i % 256]) * 100 for i in range(3000)]
    batch = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "image": pa.array(images, pa.binary()),
            "label": pa.array(ids % 3, pa.int32()),
            "split": ["train"] * len(ids),
        }
    )
    parts = 8
    pieces = list(_Route(plan, "train", parts, piece_bytes=20_000)(batch))
    routed = pa.concat_tables(pieces)
    assert len(pieces) > 1 and all(
        pa.compute.sum(pa.compute.binary_length(t["image"])).as_py() <= 20_000 for t in pieces
    )
    hub_parts = routed.filter(pa.compute.equal(routed["id"], hub))["part"].to_pylist()
    assert sorted(hub_parts) == sorted(set(hub_parts)) and len(hub_parts) <= parts
    assert sorted(set(hub_parts)) == sorted(set((plan.unit % parts).tolist()))
    # every other image goes to the one partition of its one item
    assert len(routed) == len(hub_parts) + 3000


def test_the_size_is_estimated_said_and_refused_past_the_bound(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = plan_items(
        _pairs(np.array([1, 1, 1, 2]), np.array([2, 3, 4, 3])),
        None,
        PairsConfig(pairs="x", mode="dataset"),
    )
    est = estimate(plan, 2048.0)
    assert (est.items, est.copies, est.distinct, est.most_named) == (4, 8, 4, 3)
    assert est.bytes == 8 * 2048
    check_size(est, max_gb=1.0)
    assert "8 image copies" in capsys.readouterr().out
    big = ItemEstimate(800_000, 1_600_000, 10_000, 400, 2048.0)  # 3.05 GiB
    with pytest.raises(SeppError) as err:
        check_size(big, max_gb=2.0)
    msg = str(err.value)
    assert "about 3.1 GiB" in msg and "max_item_table_gb=2" in msg
    assert "`m`" in msg and "`lo`" in msg
    check_size(big, max_gb=None)


def test_the_plan_hash_carries_the_table_version(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_items(_pairs(np.array([1]), np.array([2])), None, PairsConfig(pairs="x"))
    now = dataplane._plan_hash(plan, "s3://d", "train")
    monkeypatch.setattr(dataplane, "ITEM_TABLE_VERSION", 1)
    assert dataplane._plan_hash(plan, "s3://d", "train") != now


def _read(files: list[str], columns: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


@pytest.mark.usefixtures("ray_cluster")
def test_one_image_named_by_30000_pairs(tmp_path: Path) -> None:
    n, hub = 30_000, 0
    others = np.arange(1, n + 1)
    hub_bytes = np.random.default_rng(1).bytes(4096)
    images = [hub_bytes] + [int(i).to_bytes(8, "little") * 4 for i in others]
    files = [
        _shard(tmp_path / "a.parquet", np.arange(0, n // 2), images[: n // 2]),
        _shard(tmp_path / "b.parquet", np.arange(n // 2, n + 1), images[n // 2 :]),
    ]
    plan = plan_items(_pairs(others, np.full(n, hub)), None, PairsConfig(pairs="x"))
    fs, _ = filesystem(files[0])
    out = write_item_table(
        plan,
        files,
        fs,
        "train",
        str(tmp_path / "items"),
        one_task_bytes=0,  # the Ray Data shuffle, in several partitions and many pieces
        piece_bytes=2**21,
        part_bytes=2**21,  # the mean image is ~170 B: about 5 partitions
    )
    assert len(out) > 1
    t = _read(out, ["image", "image2", "image_id", "image2_id", "label"])
    assert len(t) == n
    assert set(t["image2"].to_pylist()) == {hub_bytes}
    assert t["image2_id"].to_pylist() == [hub] * n
    ids = t["image_id"].to_numpy()
    assert sorted(ids.tolist()) == others.tolist()
    assert t["image"].to_pylist() == [int(i).to_bytes(8, "little") * 4 for i in ids]
    assert t["label"].to_pylist() == (ids % 7).tolist()
    for f in out:  # pieces of at most ~2 MiB of images: row groups of 256 rows of 4 KiB each
        meta = pq.ParquetFile(f).metadata
        assert all(meta.row_group(g).num_rows <= 256 for g in range(meta.num_row_groups))


def _noise_jpegs(n: int, size: int, seed: int) -> list[bytes]:
    """Random-noise JPEGs of ``size`` px, ~1.6 KB each at 64 px (real ones are ~2 KB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, (1, 1, 3))
        a = np.clip(base + rng.integers(-32, 33, (size, size, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=75)
        out.append(buf.getvalue())
    return out


@pytest.mark.slow  # writes ~2.5 GB of items
@pytest.mark.usefixtures("ray_cluster")
def test_800000_pairs_over_10000_images_of_64_px(tmp_path: Path) -> None:
    """One shard holds every image, so before routing its requests alone made one Arrow array
    of all 1.6 M image copies, ~2.5 GB: past the 2 GiB a binary array holds."""
    n_img, n_pairs = 10_000, 800_000
    images = _noise_jpegs(n_img, 64, seed=0)
    files = [_shard(tmp_path / "one.parquet", np.arange(n_img), images)]
    k = np.arange(n_pairs)
    a = k % n_img
    p = (a + 1 + k // n_img) % n_img  # 80 distinct positives per image
    plan = plan_items(_pairs(a, p), None, PairsConfig(pairs="x"))
    fs, _ = filesystem(files[0])
    copies = 2 * n_pairs * float(np.mean([len(x) for x in images]))
    assert copies > 2**31  # what one array of a shard's requests would have held
    out = write_item_table(plan, files, fs, "train", str(tmp_path / "items"), max_gb=4.0)
    ids = _read(out, ["item_id", "image_id", "image2_id"])
    assert len(ids) == n_pairs and len(set(ids["item_id"].to_pylist())) == n_pairs
    got = sorted(zip(ids["image_id"].to_pylist(), ids["image2_id"].to_pylist(), strict=True))
    assert got == sorted(zip(a.tolist(), p.tolist(), strict=True))
    first = pq.ParquetFile(out[0]).read_row_group(0).to_pylist()[:50]
    for r in first:
        assert r["image"] == images[r["image_id"]] and r["image2"] == images[r["image2_id"]]
    written = sum(
        pq.ParquetFile(f).metadata.row_group(g).column(1).total_uncompressed_size
        for f in out
        for g in range(pq.ParquetFile(f).metadata.num_row_groups)
    )
    assert written > 2**30  # the image column alone: half the copies
