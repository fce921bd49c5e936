"""Training items for each pair mode: the plan from ids (pure), and the item table a Ray Data job
writes with the images they name (the session's cluster)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem
from sepp_ray.train.item_table import write_item_table
from sepp_ray.train.items import (
    AUGMENTATION,
    CURATED,
    GROUPED,
    SEMANTIC,
    PairsConfig,
    groups,
    plan_items,
)
from tests.imagetree import encode, rgb

IDS = [11, 22, 33, 44]


def _pairs(a: list[int], p: list[int]) -> pa.Table:
    return pa.table({"anchor_id": pa.array(a, pa.int64()), "positive_id": pa.array(p, pa.int64())})


def test_dataset_mode_plans_one_item_per_pair_with_the_positive_as_image2() -> None:
    plan = plan_items(_pairs([11, 33], [22, 44]), None, PairsConfig(pairs="x", mode="dataset"))
    assert plan.counts["semantic"] == 2 and plan.rows == 2 and plan.originals
    assert plan.a.tolist() == [11, 33] and plan.b.tolist() == [22, 44]
    assert set(plan.kind.tolist()) == {SEMANTIC} and not set(IDS) & set(plan.item_id.tolist())
    assert len(plan.exclude) == 0 and plan.pos == [[], []]


def test_augmentation_pairs_are_the_same_count_of_one_image_twice() -> None:
    cfg = PairsConfig(pairs="x", mode="dataset", augmentation_pairs=True)
    plan = plan_items(_pairs([11, 33], [22, 44]), None, cfg)
    assert plan.counts["augmentation"] == 2 and plan.counts["semantic"] == 0
    assert plan.b.tolist() == [-1, -1] and set(plan.kind.tolist()) == {AUGMENTATION}


def test_grouped_modes_move_pair_images_into_groups_and_out_of_the_originals() -> None:
    for mode in ("multi_positive", "cancel"):
        plan = plan_items(_pairs([11, 33], [22, 44]), None, PairsConfig(pairs="x", mode=mode))
        assert set(plan.kind.tolist()) == {GROUPED}
        assert plan.exclude.tolist() == IDS  # each image trains once: in its group
        assert plan.item_id.tolist() == plan.a.tolist()  # grouped rows keep their image id
        pos = dict(zip(plan.a.tolist(), plan.pos, strict=True))
        assert pos == {11: [22], 22: [11], 33: [44], 44: [33]}
        # rows of one group share a group id, different groups differ
        g = dict(zip(plan.a.tolist(), plan.group.tolist(), strict=True))
        assert g[11] == g[22] != g[33] == g[44]


def test_groups_are_disjoint_and_capped() -> None:
    a = np.array([1, 1, 1, 2, 3], np.int64)
    p = np.array([2, 3, 4, 3, 5], np.int64)
    gs = groups(a, p, cap=2, seed=0)
    flat = [x for g in gs for x in g]
    assert len(flat) == len(set(flat))  # every image in at most one group
    assert all(2 <= len(g) <= 3 for g in gs)


def test_both_mode_has_pair_items_and_groups() -> None:
    plan = plan_items(_pairs([11], [22]), None, PairsConfig(pairs="x", mode="both"))
    assert sorted(plan.kind.tolist()) == [SEMANTIC, GROUPED, GROUPED]


def test_curated_pairs_with_and_without_originals() -> None:
    curated = pa.table({"image_a": [11], "image_b": [44]})
    plan = plan_items(None, curated, PairsConfig(mode="none", curated="c.parquet"))
    assert plan.kind.tolist() == [CURATED] and plan.originals
    only = PairsConfig(mode="none", curated="c.parquet", curated_only=True)
    assert not plan_items(None, curated, only).originals
    with pytest.raises(SeppError, match="image_a, image_b"):
        plan_items(None, pa.table({"a": [1]}), PairsConfig(curated="c.parquet"))


def test_bad_pair_configs_fail_clearly(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SeppError, match="duplicate"):
        plan_items(_pairs([11, 11], [22, 22]), None, PairsConfig(pairs="x", mode="dataset"))
    with pytest.raises(SeppError, match="pairs.mode"):
        PairsConfig(mode="bogus").validate()
    with pytest.raises(SeppError, match="control of dataset mode"):
        PairsConfig(pairs="x", mode="multi_positive", augmentation_pairs=True).validate()
    with caplog.at_level(logging.WARNING):
        plan = plan_items(None, None, PairsConfig(mode="dataset"))
    assert plan.rows == 0 and "no pairs were given" in caplog.text


def _shards(tmp: Path, n_files: int = 3, per_file: int = 4) -> tuple[list[str], dict[int, bytes]]:
    blobs: dict[int, bytes] = {}
    files = []
    for f in range(n_files):
        ids = [100 + f * per_file + i for i in range(per_file)]
        imgs = [encode(rgb(i, 8)) for i in ids]
        blobs.update(zip(ids, imgs, strict=True))
        path = tmp / f"part-{f}.parquet"
        pq.write_table(
            pa.table(
                {
                    "id": pa.array(ids, pa.int64()),
                    "image": imgs,
                    "label": pa.array([i % 3 for i in ids], pa.int32()),
                    "split": ["train"] * per_file,
                }
            ),
            path,
        )
        files.append(str(path))
    return files, blobs


@pytest.mark.parametrize("one_task_bytes", [2**28, 0], ids=["one-task", "ray-data-shuffle"])
@pytest.mark.usefixtures("ray_cluster")
def test_item_table_fetches_the_named_images_across_shards(
    tmp_path: Path, one_task_bytes: int
) -> None:
    files, blobs = _shards(tmp_path)
    pairs = _pairs([100, 104, 111], [108, 101, 100])
    cfg = PairsConfig(pairs="x", mode="both", max_positives=2)
    plan = plan_items(pairs, None, cfg)
    fs, _ = filesystem(files[0])
    out = write_item_table(plan, files, fs, "train", str(tmp_path / "items"), 0, one_task_bytes)
    rows = pa.concat_tables([pq.read_table(f) for f in out]).to_pylist()
    assert len(rows) == plan.rows
    for r in rows:
        i = plan.item_id.tolist().index(r["item_id"])
        assert r["image"] == blobs[int(plan.a[i])]
        assert r["image2"] == (blobs[int(plan.b[i])] if plan.b[i] >= 0 else None)
        assert r["label"] == int(plan.a[i]) % 3 and r["kind"] == plan.kind[i]
    # the rows of a group are written next to each other
    order = [r["group"] for r in rows if r["group"] >= 0]
    runs = [g for k, g in enumerate(order) if k == 0 or g != order[k - 1]]
    assert len(runs) == len(set(runs))


@pytest.mark.usefixtures("ray_cluster")
def test_item_table_refuses_pairs_naming_absent_images(tmp_path: Path) -> None:
    files, _ = _shards(tmp_path)
    plan = plan_items(_pairs([100], [999]), None, PairsConfig(pairs="x", mode="dataset"))
    fs, _ = filesystem(files[0])
    with pytest.raises(SeppError, match="absent from split 'train'"):
        write_item_table(plan, files, fs, "train", str(tmp_path / "items"))
