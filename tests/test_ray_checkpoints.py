"""How a run's checkpoints meet Ray Train, without a cluster: what Ray is told to keep, how its
checkpoints map back to the run's URIs, which one is best, and that a store's filesystem
compares equal in another process (Ray Train accepts a checkpoint reported in place only on a
filesystem equal to its run's)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import pytest
from ray.train import Checkpoint

from sepp_ray.storage import ray_storage_filesystem
from sepp_ray.train.ray_checkpoints import (
    best_uri,
    checkpoint_config,
    checkpoint_name,
    run_storage,
    uri_of,
)


def test_ray_keeps_the_best_by_the_knn_monitor_or_else_the_newest() -> None:
    scored = checkpoint_config(keep=2, scored=True)
    assert scored.num_to_keep == 2
    assert (scored.checkpoint_score_attribute, scored.checkpoint_score_order) == ("knn_top1", "max")
    unscored = checkpoint_config(keep=3, scored=False)
    assert unscored.num_to_keep == 3 and unscored.checkpoint_score_attribute is None
    assert checkpoint_config(keep=0, scored=True).num_to_keep is None  # 0: keep them all


def test_the_run_folder_is_the_checkpoints_folder_and_maps_back(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = str(tmp_path / "run")
    storage = run_storage(out)
    assert storage == {"name": "checkpoints", "storage_path": out, "storage_filesystem": None}
    ray_path = f"{out}/checkpoints/{checkpoint_name(7)}"
    assert uri_of(out, Checkpoint(ray_path)) == f"{out}/checkpoints/epoch-00007"
    # on object storage Ray's paths carry no scheme; the run's URIs do
    monkeypatch.setenv("SEPP_S3_ENDPOINT", "http://127.0.0.1:9")
    fs = ray_storage_filesystem("s3://bucket/x/run")
    ckpt = Checkpoint("bucket/x/run/checkpoints/epoch-00003/", filesystem=fs)
    assert uri_of("s3://bucket/x/run", ckpt) == "s3://bucket/x/run/checkpoints/epoch-00003"


@dataclass
class _Result:
    best_checkpoints: list[tuple[Checkpoint, dict[str, Any]]]


def test_the_best_checkpoint_is_the_one_with_the_best_knn_top1(tmp_path: Any) -> None:
    out = str(tmp_path / "run")

    def kept(epoch: int, **metrics: float) -> tuple[Checkpoint, dict[str, Any]]:
        return Checkpoint(f"{out}/checkpoints/{checkpoint_name(epoch)}"), metrics

    result = _Result([kept(1, knn_top1=0.4), kept(2, knn_top1=0.7), kept(3, knn_top1=0.5)])
    assert best_uri(result, out) == f"{out}/checkpoints/epoch-00002"  # type: ignore[arg-type]
    assert best_uri(_Result([kept(1, loss=1.0)]), out) is None  # type: ignore[arg-type]


def test_a_stores_filesystem_equals_itself_in_another_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SEPP_S3_ENDPOINT", "http://127.0.0.1:9")
    here = ray_storage_filesystem("s3://bucket/a")
    there = pickle.loads(pickle.dumps(ray_storage_filesystem("s3://bucket/b")))
    assert here == there
    assert here.handler.fs is not there.handler.fs  # another instance, the same store
    monkeypatch.setenv("SEPP_S3_ENDPOINT", "http://127.0.0.1:10")
    from sepp_ray.storage import _s3fs

    _s3fs.cache_clear()
    assert ray_storage_filesystem("s3://bucket/a") != here  # another endpoint: another store
