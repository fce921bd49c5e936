"""Ingest on the session's real Ray cluster: schema, id stability, bad inputs, S3, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.data.images import decode_rgb
from sepp_ray.data.ingest import ImageOptions, IngestShard, ingest
from sepp_ray.data.schema import IMAGE_SCHEMA
from sepp_ray.data.sources import SourceOptions, open_source
from sepp_ray.data.sources.base import image_id
from sepp_ray.errors import IncompleteError, SeppError
from tests.imagetree import write_bad_files, write_tree

pytestmark = pytest.mark.usefixtures("ray_cluster")
REPO = Path(__file__).resolve().parents[1]


def _table(uri: str) -> pa.Table:
    return ImageDataset.open(uri).read_table().sort_by("id")


def test_digits_schema_counts_and_stable_ids(tmp_path: Path) -> None:
    src = open_source("digits")
    m1 = ingest(src, str(tmp_path / "a"))
    m2 = ingest(open_source("digits"), str(tmp_path / "b"))
    t1, t2 = _table(str(tmp_path / "a")), _table(str(tmp_path / "b"))
    assert t1.schema.equals(IMAGE_SCHEMA)
    assert t1.num_rows == 1797 == m1["num_images"]
    assert t1["id"].to_pylist() == t2["id"].to_pylist()  # same ids on every run
    assert len(set(t1["id"].to_pylist())) == 1797
    assert m1["classes"] == [str(i) for i in range(10)]
    sp = m1["splits"]
    assert sp["train"]["total"] + sp["val"]["total"] + sp["test"]["total"] == 1797
    # the seeded val carve: ~5 % of train, by image id, the same on every run
    assert 0.03 < sp["val"]["total"] / (sp["train"]["total"] + sp["val"]["total"]) < 0.07
    assert sp == m2["splits"]
    assert m1["source"]["fingerprint"] == m2["source"]["fingerprint"]
    assert m1["image_size"] == {"width": [32, 32], "height": [32, 32], "uniform": True}
    first = t1.slice(0, 1).to_pylist()[0]
    assert decode_rgb(first["image"]).shape == (32, 32, 3)
    assert first["id"] == image_id(first["key"])


def test_imagefolder_with_splits_and_bad_files(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    good = write_tree(root, classes=("cat", "dog"), per_class=3, splits=("train", "test"))
    expect = write_bad_files(root / "train" / "dog")
    m = ingest(open_source(str(root)), str(tmp_path / "out"))
    n_skip = sum(v == "skip" for v in expect.values())
    n_conv = sum(v == "convert" for v in expect.values())
    assert m["num_images"] == len(good) + n_conv
    assert m["skipped"]["count"] == n_skip
    assert m["classes"] == ["cat", "dog"]
    assert m["splits"]["train"]["per_class"] == {"cat": 3, "dog": 3 + n_conv}
    assert m["splits"]["test"]["total"] == 6
    assert m["converted"] == {"grayscale": 1, "alpha": 1, "16bit": 1}
    listed = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert sorted(Path(x["path"]).name for x in listed) == sorted(
        k for k, v in expect.items() if v == "skip"
    )
    reasons = {Path(x["path"]).name: x["reason"] for x in listed}
    assert reasons["zero.png"].startswith("empty file")
    assert reasons["notes.txt"] == "not an image file: .txt (expected beside images)"
    t = _table(str(tmp_path / "out"))
    for blob in t["image"].to_pylist():
        assert decode_rgb(blob).shape == (16, 16, 3)


def test_flat_imagefolder_is_one_train_split(tmp_path: Path) -> None:
    write_tree(tmp_path / "flat", classes=("a", "b", "c"), per_class=2)
    m = ingest(
        open_source(str(tmp_path / "flat")),
        str(tmp_path / "o"),
        ImageOptions(resize=8, encoding="png"),
    )
    assert list(m["splits"]) == ["train"] and m["num_images"] == 6
    assert m["image_size"]["width"] == [8, 8]


def test_same_ingest_to_local_and_s3(tmp_path: Path, bucket: str) -> None:
    src = open_source("synthetic", options=SourceOptions(n=300, size=24, chunk_size=100))
    ingest(src, str(tmp_path / "local"))
    ingest(src, f"{bucket}/datasets/syn")
    a, b = _table(str(tmp_path / "local")), _table(f"{bucket}/datasets/syn")
    assert a.equals(b)
    ds = ImageDataset.open(f"{bucket}/datasets/syn").to_ray(columns=["id"])
    assert sorted(ds.to_pandas()["id"].tolist()) == a["id"].to_pylist()


def test_s3_source_is_read_too(tmp_path: Path, bucket: str) -> None:
    import s3fs  # noqa: F401  (the storage layer's filesystem)

    from sepp_ray.storage import filesystem

    write_tree(tmp_path / "tree", per_class=2)
    fs, path = filesystem(f"{bucket}/raw")
    fs.put(str(tmp_path / "tree"), path, recursive=True)
    m = ingest(open_source(f"{bucket}/raw"), f"{bucket}/ingested")
    assert m["num_images"] == 4 and m["classes"] == ["cat", "dog"]


def test_no_valid_image_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    write_bad_files(tmp_path / "bad" / "only")
    for name in ("gray.png", "rgba.png", "deep16.png"):
        (tmp_path / "bad" / "only" / name).unlink()
    out = tmp_path / "out"
    with pytest.raises(SeppError, match="no valid image"):
        ingest(open_source(str(tmp_path / "bad")), str(out))
    assert not out.exists()


@pytest.mark.parametrize(
    "spec,fmt,message",
    [
        ("/definitely/not/here", "auto", "does not exist"),
        ("digits", "tiff-stack", "unknown format 'tiff-stack'"),
    ],
)
def test_bad_sources(spec: str, fmt: str, message: str) -> None:
    with pytest.raises(SeppError, match=message):
        open_source(spec, fmt)


def test_refuses_complete_output_without_overwrite(tmp_path: Path) -> None:
    src = open_source("synthetic", options=SourceOptions(n=20))
    ingest(src, str(tmp_path / "o"))
    with pytest.raises(SeppError, match="already holds a complete result"):
        ingest(src, str(tmp_path / "o"))
    m = ingest(
        open_source("synthetic", options=SourceOptions(n=30)), str(tmp_path / "o"), overwrite=True
    )
    assert m["num_images"] == 30 == ImageDataset.open(str(tmp_path / "o")).num_images


def test_shards_without_manifest_are_not_readable(tmp_path: Path) -> None:
    """The worker half alone (shards written, driver gone before the manifest)."""
    from sepp_ray.storage import begin_write

    src = open_source("synthetic", options=SourceOptions(n=50, chunk_size=25))
    out = str(tmp_path / "o")
    begin_write(out)
    shard = IngestShard(src, out, ImageOptions())
    row = shard.run_unit(0, src.units()[0])
    assert row["rows"] == 25 and (tmp_path / "o" / row["file"]).exists()
    with pytest.raises(IncompleteError):
        ImageDataset.open(out)


def test_killed_ingest_is_not_readable_and_a_rerun_completes(
    tmp_path: Path, ray_cluster: str
) -> None:
    out = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "sepp_ray.cli",
        "ingest",
        "synthetic",
        str(out),
        "source_options.n=6000",
        "source_options.chunk_size=100",
        "images.encoding=png",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "shards").glob("*.parquet")):
        time.sleep(0.2)
    assert list((out / "shards").glob("*.parquet")), "ingest never started writing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    with pytest.raises(IncompleteError, match="being written or a write crashed"):
        ImageDataset.open(str(out))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ImageDataset.open(str(out)).num_images == 6000
    assert len(np.unique(_table(str(out))["id"].to_numpy())) == 6000


def test_every_binary_source_kind_through_ingest(tmp_path: Path) -> None:
    from tests.formats import write_cifar10, write_cifar100, write_parquet_table, write_stl10

    write_cifar10(tmp_path / "c10", n_train_per_batch=4, n_test=5)
    write_cifar100(tmp_path / "c100", n_train=12, n_test=6)
    write_stl10(tmp_path / "stl", n_train=5, n_test=4, n_unlabeled=3)
    write_parquet_table(tmp_path / "pq" / "table.parquet", n_rows=10)
    expect = {
        "c10": ("cifar10", {"train": 20, "test": 5}, 10),
        "c100": ("cifar100", {"train": 12, "test": 6}, 100),
        "stl": ("stl10", {"train": 5, "test": 4, "unlabeled": 3}, 10),
    }
    for name, (fmt, splits, n_classes) in expect.items():
        src = open_source(str(tmp_path / name))  # auto-detected from the parent folder
        assert src.kind == fmt
        m = ingest(src, str(tmp_path / f"out-{name}"), ImageOptions(val_fraction=0.0))
        assert {k: v["total"] for k, v in m["splits"].items()} == splits
        assert len(m["classes"]) == n_classes
    assert (
        ImageDataset.open(str(tmp_path / "out-stl")).manifest["splits"]["unlabeled"]["labeled"] == 0
    )
    src = open_source(str(tmp_path / "pq"))
    assert src.kind == "parquet"
    m = ingest(src, str(tmp_path / "out-pq"))
    assert m["num_images"] == 10
    c10 = _table(str(tmp_path / "out-c10"))
    assert decode_rgb(c10["image"][0].as_py()).shape == (32, 32, 3)


def test_val_carve_is_seeded_and_a_source_val_split_needs_none(tmp_path: Path) -> None:
    from sepp_ray.data.ingest import carve_val

    ids = np.arange(1, 20_001, dtype=np.int64) * 7919
    a, b = carve_val(ids, 0.1, 0), carve_val(ids, 0.1, 1)
    assert abs(a.mean() - 0.1) < 0.01 and abs(b.mean() - 0.1) < 0.01
    assert np.array_equal(a, carve_val(ids, 0.1, 0)) and not np.array_equal(a, b)
    assert not carve_val(ids, 0.0, 0).any()
    root = tmp_path / "tree"
    write_tree(root, classes=("cat", "dog"), per_class=2, splits=("train", "val"))
    with pytest.raises(SeppError, match="has its own 'val' split"):
        ingest(open_source(str(root)), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()
    m = ingest(open_source(str(root)), str(tmp_path / "out"), ImageOptions(val_fraction=0.0))
    assert m["splits"]["val"]["total"] == 4


def test_a_resized_jpeg_stays_a_jpeg(tmp_path: Path) -> None:
    from sepp_ray.data.images import process
    from tests.imagetree import encode, rgb

    out = process(encode(rgb(3, 64), "JPEG"), resize=32, jpeg_quality=90)
    assert (
        out.data is not None and out.data[:2] == b"\xff\xd8" and (out.width, out.height) == (32, 32)
    )
    png = process(encode(rgb(3, 64), "PNG"), resize=32)
    assert png.data is not None and png.data[:4] == b"\x89PNG"
