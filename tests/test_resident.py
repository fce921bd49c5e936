"""The resident data plane: the automatic choice, item indices, the per-epoch order, and a
rank's batches served from memory (pure functions and the feed on decoded parts; no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sepp_ray.errors import SeppError
from sepp_ray.train.items import PairsConfig, plan_items
from sepp_ray.train.plan import Chunk
from sepp_ray.train.resident import (
    PlaneChoice,
    ResidentFeed,
    ResidentItems,
    ResidentPlan,
    choose_plane,
    decode_chunk,
    epoch_index,
    index_items,
)


def _manifest(n: int, w: int = 32, h: int = 32, uniform: bool = True) -> dict:
    return {
        "splits": {"train": {"total": n, "labeled": n}},
        "image_size": {
            "width": [w, w + (0 if uniform else 8)],
            "height": [h, h],
            "uniform": uniform,
        },
    }


def test_the_choice_follows_the_decoded_size_on_both_sides_of_the_budget() -> None:
    m = _manifest(1000)  # 1000 x 32 x 32 x 3 = 3,072,000 bytes
    assert choose_plane("auto", m, "train", "cpu", 3_072_000).mode == "resident"
    below = choose_plane("auto", m, "train", "cpu", 3_071_999)
    assert below.mode == "stream" and "GiB" in below.reason
    assert below.decoded_bytes == 3_072_000
    assert choose_plane("stream", m, "train", "cpu", 10**12).mode == "stream"
    with pytest.raises(SeppError, match="resident_max_gb"):
        choose_plane("resident", m, "train", "cpu", 1000)


def test_the_choice_refuses_what_cannot_be_resident() -> None:
    mixed = _manifest(10, uniform=False)
    assert choose_plane("auto", mixed, "train", "cpu", 10**12).mode == "stream"
    with pytest.raises(SeppError, match="several sizes"):
        choose_plane("resident", mixed, "train", "cpu", 10**12)
    gpu = choose_plane("auto", _manifest(10), "train", "gpu", 10**12)
    assert gpu.mode == "stream" and "decode_on=gpu" in gpu.reason
    with pytest.raises(SeppError, match="decode_on=gpu"):
        choose_plane("resident", _manifest(10), "train", "gpu", 10**12)
    with pytest.raises(SeppError, match="data_plane"):
        choose_plane("gpu", _manifest(10), "train", "cpu", 10**12)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_item_once_an_epoch_over_all_ranks(world: int) -> None:
    n, local = 96, 6
    steps = n // (world * local)
    unit = np.arange(n) + 1000
    for epoch in (0, 1):
        seen = np.concatenate(
            [epoch_index(unit, 7, epoch, world, r, steps, local).ravel() for r in range(world)]
        )
        assert sorted(seen.tolist()) == list(range(n))
    a = epoch_index(unit, 7, 0, world, 0, steps, local)
    assert a.shape == (steps, local)
    np.testing.assert_array_equal(a, epoch_index(unit, 7, 0, world, 0, steps, local))  # resume
    assert not np.array_equal(a, epoch_index(unit, 7, 1, world, 0, steps, local))
    assert not np.array_equal(a, epoch_index(unit, 8, 0, world, 0, steps, local))


def test_leftovers_are_fewer_than_a_global_batch_and_differ_between_epochs() -> None:
    n, local, world = 50, 4, 2
    steps = n // (world * local)  # 6 steps use 48 items: 2 left over each epoch
    unit = np.arange(n)
    used = [
        set(
            np.concatenate(
                [epoch_index(unit, 0, e, world, r, steps, local).ravel() for r in (0, 1)]
            ).tolist()
        )
        for e in range(4)
    ]
    assert all(len(u) == 48 for u in used)
    left = [frozenset(set(range(n)) - u) for u in used]
    assert len(set(left)) > 1
    with pytest.raises(SeppError, match="exceed"):
        epoch_index(unit, 0, 0, world, 0, steps + 1, local)
    with pytest.raises(SeppError, match="outside"):
        epoch_index(unit, 0, 0, world, 2, steps, local)


def test_groups_land_in_one_batch() -> None:
    # 40 singles and 4 groups of 3 (units named by their group)
    unit = np.concatenate([np.arange(40), np.repeat([900, 901, 902, 903], 3)])
    order = epoch_index(unit, 3, 0, 1, 0, 52 // 4, 4)
    for g in (900, 901, 902, 903):
        rows = np.flatnonzero(unit == g)
        where = {int(np.flatnonzero((order == r).any(1))[0]) for r in rows if (order == r).any()}
        assert len(where) <= 1, f"group {g} split over batches {where}"


def _pairs(a: list[int], p: list[int]) -> pa.Table:
    return pa.table({"anchor_id": pa.array(a, pa.int64()), "positive_id": pa.array(p, pa.int64())})


def test_pair_items_are_index_pairs_into_the_split() -> None:
    ids = np.array([10, 20, 30, 40, 50], np.int64)
    plan = plan_items(_pairs([10, 30], [50, 20]), None, PairsConfig(pairs="x"), 0)
    index = index_items(ResidentItems.of(plan, 1), ids)
    assert index.rows == 5 + 2
    np.testing.assert_array_equal(index.row_a[:5], np.arange(5))  # originals: (i, i)
    np.testing.assert_array_equal(index.row_b[:5], np.arange(5))
    np.testing.assert_array_equal(ids[index.row_a[5:]], [10, 30])
    np.testing.assert_array_equal(ids[index.row_b[5:]], [50, 20])
    ap = plan_items(
        _pairs([10, 30], [50, 20]), None, PairsConfig(pairs="x", augmentation_pairs=True), 0
    )
    ap_index = index_items(ResidentItems.of(ap, 1), ids)
    np.testing.assert_array_equal(ap_index.row_a[5:], ap_index.row_b[5:])  # one image twice
    bad = plan_items(_pairs([10], [99]), None, PairsConfig(pairs="x"), 0)
    with pytest.raises(SeppError, match=r"image id\(s\) absent from the training split"):
        index_items(ResidentItems.of(bad, 1), ids)


def test_grouped_images_train_in_their_groups_not_as_originals() -> None:
    ids = np.arange(10, dtype=np.int64)
    cfg = PairsConfig(pairs="x", mode="multi_positive", max_positives=2)
    plan = plan_items(_pairs([0, 0, 5], [1, 2, 6]), None, cfg, 0)
    items = ResidentItems.of(plan, 2)
    index = index_items(items, ids)
    assert index.rows == items.count(10) == 10  # 5 grouped images moved into 2 groups
    grouped = index.group >= 0
    assert sorted(ids[index.row_a[grouped]].tolist()) == [0, 1, 2, 5, 6]
    assert sorted(ids[index.row_a[~grouped]].tolist()) == [3, 4, 7, 8, 9]
    g0 = index.pos[np.flatnonzero(ids[index.row_a] == 0)[0]]
    assert set(g0.tolist()) == {1, 2}


def _part(ids: list[int], size: int = 8) -> dict[str, np.ndarray]:
    img = np.stack([np.full((size, size, 3), i % 251, np.uint8) for i in ids])
    return {"id": np.array(ids, np.int64), "label": np.array(ids, np.int64) % 3, "image": img}


def _plan(parts: list, plan_pairs: pa.Table | None, batch: int, steps: int) -> ResidentPlan:
    items = ResidentItems.of(
        plan_items(plan_pairs, None, PairsConfig(pairs="x" if plan_pairs else None), 0), 1
    )
    n = sum(len(p["id"]) for p in parts)
    return ResidentPlan(
        refs=parts,
        shape=(8, 8),
        images=n,
        items=items,
        global_batch=batch,
        steps_per_epoch=items.count(n) // batch,
        total_steps=steps,
        seed=5,
        choice=PlaneChoice("resident", "test", n * 192),
    )


def test_a_rank_serves_its_batches_from_memory() -> None:
    parts = [_part([7, 3, 11]), _part([5, 1, 9, 13, 2])]  # out of id order, as tasks return them
    plan = _plan(parts, _pairs([3, 5], [9, 1]), batch=4, steps=4)  # 10 items: 2 steps an epoch
    feeds = [ResidentFeed(plan, "cpu") for _ in range(2)]
    seen_pairs: set[tuple[int, int]] = set()
    for epoch in (0, 1):
        got = [list(f.batches(epoch, 2, r)) for r, f in enumerate(feeds)]
        assert all(len(g) == plan.steps_in(epoch) == 2 for g in got)
        ids = [int(i) for g in got for b in g for i in b["id"]]
        assert len(ids) == len(set(ids)) == 8  # no item twice in an epoch
        for b in (b for g in got for b in g):
            assert b["image"].shape == (2, 8, 8, 3) and b["image"].dtype == torch.uint8
            va, vb = b["view_ids"][:, 0], b["view_ids"][:, 1]
            # every image's pixels carry its id: view 1 is image A, view 2 image B
            assert torch.equal(b["image"][:, 0, 0, 0].long(), va % 251)
            assert torch.equal(b["image2"][:, 0, 0, 0].long(), vb % 251)
            assert torch.equal(b["label"], va % 3)
            pair = va != vb
            seen_pairs |= {(int(x), int(y)) for x, y in zip(va[pair], vb[pair], strict=True)}
    assert seen_pairs and seen_pairs <= {(3, 9), (5, 1)}


def test_pinned_host_fallback_serves_the_same_batches() -> None:
    parts = [_part(list(range(12)))]
    plan = _plan(parts, None, batch=4, steps=3)
    on_dev = list(ResidentFeed(plan, "cpu").batches(0, 1, 0))
    feed = ResidentFeed(plan, "cpu", host_only=True)
    assert feed.where.type == "cpu"
    for a, b in zip(on_dev, list(feed.batches(0, 1, 0)), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_loaded_split_must_match_the_plan() -> None:
    plan = _plan([_part([1, 2, 3, 4])], None, batch=2, steps=2)
    short = ResidentPlan(**{**plan.__dict__, "refs": [_part([1, 2, 3])]})
    with pytest.raises(SeppError, match="changed under a running job"):
        ResidentFeed(short, "cpu")
    dup = ResidentPlan(**{**plan.__dict__, "refs": [_part([1, 2]), _part([2, 3])]})
    with pytest.raises(SeppError, match="repeated image ids"):
        ResidentFeed(dup, "cpu")


def _shard(tmp_path, sizes: list[tuple[int, int]]) -> Chunk:
    blobs = []
    for i, (w, h) in enumerate(sizes):
        buf = io.BytesIO()
        Image.new("L" if i == 0 else "RGB", (w, h), 40 * i).save(buf, "PNG")
        blobs.append(buf.getvalue())
    n = len(sizes)
    table = pa.table(
        {
            "id": pa.array(range(100, 100 + n), pa.int64()),
            "label": pa.array([0] + [None] * (n - 1), pa.int32()),
            "split": ["train", "val"] + ["train"] * (n - 2),
            "image": pa.array(blobs, pa.binary()),
        }
    )
    path = str(tmp_path / "shard.parquet")
    pq.write_table(table, path)
    return Chunk(path, 0, n - 1, "images")


def test_decode_chunk_keeps_the_split_and_refuses_a_wrong_size(tmp_path) -> None:
    good = decode_chunk(_shard(tmp_path, [(6, 4)] * 4), "train", (4, 6))
    np.testing.assert_array_equal(good["id"], [100, 102, 103])
    np.testing.assert_array_equal(good["label"], [0, -1, -1])
    assert good["image"].shape == (3, 4, 6, 3)  # a grayscale PNG comes out RGB
    assert int(good["image"][2, 0, 0, 0]) == 120
    with pytest.raises(SeppError, match="re-ingest"):
        decode_chunk(_shard(tmp_path, [(6, 4), (6, 4), (6, 5)]), "train", (4, 6))
