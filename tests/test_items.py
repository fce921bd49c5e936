"""Training items for each pair mode, and their decoding (pure, no Ray)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest

from sepp_ray.errors import SeppError
from sepp_ray.train.decode import DecodeItems
from sepp_ray.train.items import AUGMENTATION, CURATED, ORIGINAL, SEMANTIC, PairsConfig, build_items
from tests.imagetree import encode, rgb

IDS = [11, 22, 33, 44]


def _images() -> pa.Table:
    return pa.table(
        {"id": pa.array(IDS, pa.int64()), "image": [encode(rgb(i, 8)) for i in range(4)]}
    )


def _pairs(a: list[int], p: list[int]) -> pa.Table:
    return pa.table({"anchor_id": pa.array(a, pa.int64()), "positive_id": pa.array(p, pa.int64())})


def test_dataset_mode_adds_one_item_per_pair_with_the_positive_as_view2() -> None:
    items, counts = build_items(_images(), _pairs([11, 33], [22, 44]), PairsConfig(mode="dataset"))
    assert counts == {"original": 4, "semantic": 2, "curated": 0, "augmentation": 0}
    rows = items.to_pylist()
    blob = dict(zip(IDS, _images()["image"].to_pylist(), strict=True))
    orig = [r for r in rows if r["kind"] == ORIGINAL]
    assert all(r["image"] == r["image2"] == blob[r["item_id"]] for r in orig)
    sem = [r for r in rows if r["kind"] == SEMANTIC]
    assert {(r["image"], r["image2"]) for r in sem} == {(blob[11], blob[22]), (blob[33], blob[44])}
    assert len({r["item_id"] for r in rows}) == 6 and not set(IDS) & {r["item_id"] for r in sem}
    assert all(r["pos_ids"] == [] for r in rows)


def test_multi_positive_mode_links_both_directions_without_extra_items() -> None:
    items, counts = build_items(
        _images(), _pairs([11, 11], [22, 33]), PairsConfig(mode="multi_positive", max_positives=4)
    )
    assert counts["semantic"] == 0 and items.num_rows == 4
    pos = dict(zip(items["item_id"].to_pylist(), items["pos_ids"].to_pylist(), strict=True))
    assert pos == {11: [22, 33], 22: [11], 33: [11], 44: []}


def test_augmentation_pairs_baseline_has_the_same_count_of_one_image_twice() -> None:
    items, counts = build_items(
        _images(), _pairs([11, 33], [22, 44]), PairsConfig(mode="dataset", augmentation_pairs=True)
    )
    assert counts["augmentation"] == 2 and counts["semantic"] == 0
    ap = [r for r in items.to_pylist() if r["kind"] == AUGMENTATION]
    assert all(r["image"] == r["image2"] for r in ap) and len(ap) == 2


def test_curated_pairs_alone() -> None:
    curated = pa.table({"image_a": [11, 22], "image_b": [44, 33]})
    items, counts = build_items(
        _images(), None, PairsConfig(mode="none", curated="x", curated_only=True), curated
    )
    assert counts == {"original": 0, "semantic": 0, "curated": 2, "augmentation": 0}
    assert set(items["kind"].to_pylist()) == {CURATED}


def test_pairs_naming_absent_ids_are_an_error_with_count_and_examples() -> None:
    with pytest.raises(SeppError, match=r"name 2 image id\(s\) absent .*\[55, 66\]"):
        build_items(_images(), _pairs([11, 55], [66, 22]), PairsConfig(mode="dataset"))


def test_no_pairs_trains_the_plain_method_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        items, counts = build_items(_images(), None, PairsConfig(mode="dataset"))
    assert counts["original"] == 4 and items.num_rows == 4
    assert "training the plain method" in caplog.text


def test_bad_pair_config() -> None:
    with pytest.raises(SeppError, match="pairs.mode must be one of"):
        PairsConfig(mode="sometimes").validate()
    with pytest.raises(SeppError, match="curated_only needs"):
        PairsConfig(curated_only=True).validate()


def test_decode_builds_fixed_size_arrays_and_padded_positives() -> None:
    items, _ = build_items(_images(), _pairs([11], [22]), PairsConfig(mode="both", max_positives=2))
    out = DecodeItems(size=12, max_positives=2)(items)
    assert out["image"].shape == (5, 12, 12, 3) and out["image"].dtype == np.uint8
    assert out["pos_ids"].tolist()[:4] == [[22, -1], [11, -1], [-1, -1], [-1, -1]]
    sem = int(np.flatnonzero(items["kind"].to_numpy() == SEMANTIC)[0])
    assert not np.array_equal(out["image"][sem], out["image2"][sem])
    assert np.array_equal(out["image2"][sem], out["image"][1])  # the positive is image 22
