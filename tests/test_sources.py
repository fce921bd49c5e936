"""CIFAR, STL-10 and Parquet sources read back exactly what the real formats hold.

Datasets are written by tests/formats.py in the official layouts; torchvision's own CIFAR and
STL-10 readers serve as an independent oracle for the pixel layout.
"""

from __future__ import annotations

import hashlib
import pickle
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sepp_ray.data.download import digest_file
from sepp_ray.data.sources.base import RawItem, Source
from sepp_ray.data.sources.cifar import Cifar10Source, Cifar100Source
from sepp_ray.data.sources.parquet_table import ParquetTableSource, split_from_name
from sepp_ray.data.sources.stl10 import IMAGE_BYTES, Stl10Source
from sepp_ray.errors import SeppError
from tests.formats import (
    make_tarball,
    stl10_bytes,
    write_cifar10,
    write_cifar100,
    write_parquet_table,
    write_stl10,
)


def read_all(source: Source) -> list[RawItem]:
    """Every item, through a pickled copy of the source and pickled units (as Ray ships them)."""
    copy = pickle.loads(pickle.dumps(source))
    return [
        item for unit in source.units() for item in copy.read_unit(pickle.loads(pickle.dumps(unit)))
    ]


def check_keys(source: Source, again: Source, n: int) -> None:
    """Keys unique, as many as images, and identical from a second instance."""
    keys = [i.key for i in read_all(source)]
    assert len(keys) == n and len(set(keys)) == n
    assert keys == [i.key for i in read_all(again)]
    assert source.units() == again.units()


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- CIFAR-10 -------------------------------------------------------------------------------


@pytest.fixture
def cifar10(tmp_path: Path) -> dict[str, Any]:
    return write_cifar10(tmp_path, n_train_per_batch=7, n_test=5, seed=1)


def test_cifar10_round_trip(cifar10: dict[str, Any], tmp_path: Path) -> None:
    src = Cifar10Source(str(tmp_path), chunk_size=3)
    items = read_all(src)
    assert src.class_names() == cifar10["class_names"]
    assert len(items) == 5 * 7 + 5
    by_key = {i.key: i for i in items}
    for name, batch in cifar10["batches"].items():
        for j, (image, label) in enumerate(zip(batch["images"], batch["labels"], strict=True)):
            item = by_key[f"cifar10/{batch['split']}/{name}/{j}"]
            assert isinstance(item.payload, np.ndarray)
            assert item.payload.dtype == np.uint8 and item.payload.shape == (32, 32, 3)
            np.testing.assert_array_equal(item.payload, image)
            assert item.label == label and item.split == batch["split"]
            assert item.origin.endswith(f"cifar-10-batches-py/{name}#{j}")
    check_keys(src, Cifar10Source(cifar10["dir"], chunk_size=3), 40)


def test_cifar_matches_torchvision(
    cifar10: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision reads the same pixels and labels from the files (md5 checks off: tiny files)."""
    import torchvision.datasets.cifar as tv

    monkeypatch.setattr(tv, "check_integrity", lambda *a, **k: True)
    items = read_all(Cifar10Source(str(tmp_path), chunk_size=4))
    ref = [tv.CIFAR10(str(tmp_path), train=t) for t in (True, False)]
    np.testing.assert_array_equal(
        np.stack([i.payload for i in items]), np.concatenate([r.data for r in ref])
    )
    assert [i.label for i in items] == ref[0].targets + ref[1].targets

    write_cifar100(tmp_path, n_train=6, n_test=4, seed=2)
    items = read_all(Cifar100Source(str(tmp_path), label_kind="fine", chunk_size=4))
    ref100 = [tv.CIFAR100(str(tmp_path), train=t) for t in (True, False)]
    np.testing.assert_array_equal(
        np.stack([i.payload for i in items]), np.concatenate([r.data for r in ref100])
    )
    assert [i.label for i in items] == ref100[0].targets + ref100[1].targets


def test_cifar10_units_cover_each_row_once(cifar10: dict[str, Any]) -> None:
    units = Cifar10Source(cifar10["dir"], chunk_size=3).units()
    for name, batch in cifar10["batches"].items():
        rows = [r for u in units if u["file"] == name for r in range(u["start"], u["stop"])]
        assert rows == list(range(len(batch["labels"])))
    assert {u["file"] for u in units} == set(cifar10["batches"])


def test_cifar10_str_keys(tmp_path: Path) -> None:
    """A batch re-pickled by Python 3 has str keys; it reads the same."""
    written = write_cifar10(tmp_path, 2, 2, seed=3, str_keys=True)
    items = read_all(Cifar10Source(str(tmp_path)))
    np.testing.assert_array_equal(items[0].payload, written["batches"]["data_batch_1"]["images"][0])
    assert Cifar10Source(str(tmp_path)).class_names()[0] == "airplane"


def test_cifar_fingerprint(cifar10: dict[str, Any]) -> None:
    a = Cifar10Source(cifar10["dir"])
    assert a.fingerprint() == Cifar10Source(cifar10["dir"]).fingerprint()
    before = a.fingerprint()
    flip_byte(Path(cifar10["dir"]) / "data_batch_2", 500)
    assert a.fingerprint() != before


def test_cifar_errors(cifar10: dict[str, Any], tmp_path: Path) -> None:
    (Path(cifar10["dir"]) / "data_batch_4").unlink()
    with pytest.raises(SeppError, match="data_batch_4"):
        Cifar10Source(str(tmp_path))
    with pytest.raises(SeppError, match="extract"):
        Cifar10Source(str(tmp_path / "cifar-10-python.tar.gz"))
    with pytest.raises(SeppError, match="does not exist"):
        Cifar10Source(str(tmp_path / "nowhere"))
    with pytest.raises(SeppError, match="label_kind"):
        Cifar100Source(str(tmp_path), label_kind="medium")


def test_cifar_refuses_code_in_pickles(cifar10: dict[str, Any], tmp_path: Path) -> None:
    """A batch whose pickle calls a function is refused before the call runs."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    with open(Path(cifar10["dir"]) / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    src = Cifar10Source(cifar10["dir"])
    with pytest.raises(SeppError, match="refusing to load global"):
        src.units()
    assert not marker.exists()


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path, n_train=9, n_test=4, seed=4)
    for kind, names in (("fine", written["fine_names"]), ("coarse", written["coarse_names"])):
        src = Cifar100Source(str(tmp_path), label_kind=kind, chunk_size=4)
        assert src.class_names() == names
        items = read_all(src)
        assert [i.split for i in items] == ["train"] * 9 + ["test"] * 4
        for split, batch in written["batches"].items():
            got = [i for i in items if i.split == split]
            assert [i.label for i in got] == batch[kind].tolist()
            np.testing.assert_array_equal(np.stack([i.payload for i in got]), batch["images"])
        assert items[3].key == "cifar100/train/train/3"
    fine = Cifar100Source(written["dir"], label_kind="fine")
    assert fine.fingerprint() != Cifar100Source(written["dir"], label_kind="coarse").fingerprint()


# ---- STL-10 ---------------------------------------------------------------------------------


def test_stl10_round_trip(tmp_path: Path) -> None:
    written = write_stl10(tmp_path, n_train=5, n_test=4, n_unlabeled=3, seed=5)
    src = Stl10Source(str(tmp_path), chunk_size=2)
    assert src.class_names() == written["class_names"]
    items = read_all(src)
    for split in ("train", "test", "unlabeled"):
        got = [i for i in items if i.split == split]
        np.testing.assert_array_equal(np.stack([i.payload for i in got]), written["images"][split])
        labels = written["labels"][split]
        assert [i.label for i in got] == ([None] * 3 if labels is None else labels.tolist())
        assert [i.key for i in got] == [f"stl10/{split}/{j}" for j in range(len(got))]
    check_keys(src, Stl10Source(written["dir"], chunk_size=2), 12)
    units = src.units()
    for split, n in (("train", 5), ("test", 4), ("unlabeled", 3)):
        rows = [r for u in units if u["split"] == split for r in range(u["start"], u["stop"])]
        assert rows == list(range(n))


def test_stl10_column_major_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte c*9216 + col*96 + row of an image is channel c at (row, col): set a pixel off the
    diagonal by hand and find it where it belongs, and where torchvision puts it."""
    d = tmp_path / "stl10_binary"
    d.mkdir()
    raw = np.zeros(2 * IMAGE_BYTES, np.uint8)
    raw[IMAGE_BYTES + 0 * 9216 + 5 * 96 + 0] = 255  # image 1, red, row 0, col 5
    raw[IMAGE_BYTES + 2 * 9216 + 1 * 96 + 7] = 200  # image 1, blue, row 7, col 1
    (d / "unlabeled_X.bin").write_bytes(raw.tobytes())
    items = read_all(Stl10Source(str(d), splits=("unlabeled",)))
    img = np.asarray(items[1].payload)
    assert img.shape == (96, 96, 3)
    assert img[0, 5, 0] == 255 and img[5, 0, 0] == 0
    assert img[7, 1, 2] == 200 and img[1, 7, 2] == 0
    assert int(img.sum()) == 455 and not np.asarray(items[0].payload).any()
    # the test writer encodes the same way
    assert stl10_bytes(np.stack([i.payload for i in items])) == raw.tobytes()

    import torchvision.datasets.stl10 as tv

    monkeypatch.setattr(tv.STL10, "_check_integrity", lambda self: True)
    ref = tv.STL10(str(tmp_path), split="unlabeled")  # data: N x 3 x H x W
    np.testing.assert_array_equal(ref.data.transpose(0, 2, 3, 1)[1], img)


def test_stl10_matches_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.stl10 as tv

    monkeypatch.setattr(tv.STL10, "_check_integrity", lambda self: True)
    write_stl10(tmp_path, n_train=3, n_test=2, n_unlabeled=2, seed=6)
    items = read_all(Stl10Source(str(tmp_path), splits=("test", "train")))
    for split in ("train", "test"):
        ref = tv.STL10(str(tmp_path), split=split)
        got = [i for i in items if i.split == split]
        np.testing.assert_array_equal(
            np.stack([i.payload for i in got]), ref.data.transpose(0, 2, 3, 1)
        )
        assert [i.label for i in got] == ref.labels.tolist()
        assert ref.classes == Stl10Source(str(tmp_path)).class_names()


def test_stl10_errors(tmp_path: Path) -> None:
    written = write_stl10(tmp_path, n_train=2, n_test=2, n_unlabeled=2, seed=7)
    d = Path(written["dir"])
    (d / "test_y.bin").unlink()
    with pytest.raises(SeppError, match="test_y.bin"):
        Stl10Source(str(tmp_path))
    assert len(read_all(Stl10Source(str(tmp_path), splits=("train", "unlabeled")))) == 4
    with pytest.raises(SeppError, match="splits"):
        Stl10Source(str(tmp_path), splits=("train", "validation"))
    with pytest.raises(SeppError, match="extract"):
        Stl10Source(str(tmp_path / "stl10_binary.tar.gz"))
    with open(d / "train_X.bin", "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(SeppError, match="truncated"):
        Stl10Source(str(tmp_path), splits=("train",))
    (d / "unlabeled_X.bin").write_bytes(b"")
    assert read_all(Stl10Source(str(d), splits=("unlabeled",))) == []
    (d / "train_X.bin").write_bytes(b"\0" * 2 * IMAGE_BYTES)
    (d / "train_y.bin").write_bytes(bytes([3, 11]))
    with pytest.raises(SeppError, match="label 11"):
        read_all(Stl10Source(str(d), splits=("train",)))


def test_stl10_fingerprint(tmp_path: Path) -> None:
    written = write_stl10(tmp_path, n_train=2, n_test=2, n_unlabeled=2, seed=8)
    a = Stl10Source(str(tmp_path)).fingerprint()
    assert a == Stl10Source(written["dir"]).fingerprint()
    assert a != Stl10Source(str(tmp_path), splits=("train", "test")).fingerprint()
    flip_byte(Path(written["dir"]) / "test_X.bin", 12345)
    assert Stl10Source(str(tmp_path)).fingerprint() != a


def test_digest_file_samples_big_files(tmp_path: Path) -> None:
    """Big files: size + first and last MiB (documented); small or full_below=None: every byte."""
    import fsspec

    fs = fsspec.filesystem("file")
    path = tmp_path / "big.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3 << 20, np.uint8).tobytes())

    def digest(full_below: int | None) -> str:
        h = hashlib.sha256()
        digest_file(fs, str(path), h, full_below=full_below)
        return h.hexdigest()

    sampled, full = digest(1), digest(None)
    flip_byte(path, (3 << 20) // 2)  # the middle: not sampled
    assert digest(1) == sampled and digest(None) != full
    flip_byte(path, 10)  # the first MiB
    assert digest(1) != sampled


# ---- Parquet tables -------------------------------------------------------------------------


def test_parquet_binary_column_int_labels(tmp_path: Path) -> None:
    path = tmp_path / "table.parquet"
    written = write_parquet_table(path, n_rows=10, seed=9, row_group_size=4, n_classes=3)
    src = ParquetTableSource(str(path))
    assert src.image_column == "image" and src.label_column == "label"
    assert src.class_names() == ["0", "1", "2"][: max(written["labels"]) + 1]
    assert [(u["row_group"], u["row_offset"], u["rows"]) for u in src.units()] == [
        (0, 0, 4),
        (1, 4, 4),
        (2, 8, 2),
    ]
    items = read_all(src)
    assert [i.payload for i in items] == written["encoded"]
    assert [i.label for i in items] == written["labels"]
    assert [i.split for i in items] == ["train"] * 10
    assert [i.key for i in items] == [f"table.parquet#{r}" for r in range(10)]
    check_keys(src, ParquetTableSource(str(path)), 10)


def test_parquet_hf_layout(tmp_path: Path) -> None:
    """The Hugging Face export: struct image column "img", ClassLabel names in the metadata,
    splits in the file names."""
    names = ["cat", "dog", "frog"]
    train = write_parquet_table(
        tmp_path,
        7,
        seed=10,
        file_names=["plain_text/train-00000-of-00001.parquet"],
        image_column="img",
        struct_image=True,
        hf_class_names=names,
    )
    test = write_parquet_table(
        tmp_path,
        3,
        seed=11,
        file_names=["plain_text/test-00000-of-00001.parquet"],
        image_column="img",
        struct_image=True,
        hf_class_names=names,
    )
    src = ParquetTableSource(str(tmp_path))
    assert src.image_column == "img" and src.class_names() == names
    items = read_all(src)
    by_split = {s: [i for i in items if i.split == s] for s in ("train", "test")}
    assert [i.payload for i in by_split["train"]] == train["encoded"]
    assert [i.payload for i in by_split["test"]] == test["encoded"]
    assert [i.label for i in by_split["test"]] == test["labels"]
    assert by_split["test"][0].key == "plain_text/test-00000-of-00001.parquet#0"


def test_parquet_string_labels_split_and_id_columns(tmp_path: Path) -> None:
    written = write_parquet_table(
        tmp_path / "t",
        11,
        seed=12,
        n_files=3,
        row_group_size=2,
        string_labels=True,
        n_classes=4,
        split_column="part",
        id_column="uid",
    )
    src = ParquetTableSource(str(tmp_path / "t"), split_column="part", id_column="uid")
    names = sorted(set(written["labels"]))
    assert src.class_names() == names
    items = read_all(src)
    assert [i.key for i in items] == written["ids"]
    assert [names[i.label] for i in items] == written["labels"]  # type: ignore[index]
    assert [i.split for i in items] == written["splits"]
    assert [i.payload for i in items] == written["encoded"]
    assert sum(u["rows"] for u in src.units()) == 11
    given = ["class_3", "class_2", "class_1", "class_0", "class_9"]
    relabeled = ParquetTableSource(str(tmp_path / "t"), class_names=given)
    assert [given[i.label] for i in read_all(relabeled)] == written["labels"]  # type: ignore[index]
    with pytest.raises(SeppError, match="not in class_names"):
        ParquetTableSource(str(tmp_path / "t"), class_names=["class_0"])


def test_parquet_null_and_negative_values(tmp_path: Path) -> None:
    """Null image bytes are yielded as skips; negative or null labels mean unlabeled."""
    from tests.formats import png_bytes, smooth_images

    png = png_bytes(smooth_images(np.random.default_rng(0), 1, 8, 8)[0])
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": png}, {"bytes": None}, {"bytes": png}],
                pa.struct([("bytes", pa.binary())]),
            ),
            "label": pa.array([2, -1, None], pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    items = read_all(ParquetTableSource(str(tmp_path / "t.parquet")))
    assert [i.label for i in items] == [2, None, None]
    assert [i.skip is not None for i in items] == [False, True, False]
    assert items[0].payload == png and items[1].payload == b""


def test_parquet_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    write_parquet_table(path, 4, seed=13, image_column="pixels", extra_binary_column="thumb")
    with pytest.raises(SeppError, match=r"several binary columns.*pixels.*thumb"):
        ParquetTableSource(str(path))
    assert ParquetTableSource(str(path), image_column="pixels").image_column == "pixels"
    with pytest.raises(SeppError, match=r"no image column 'photo'.*pixels \(binary\)"):
        ParquetTableSource(str(path), image_column="photo")
    with pytest.raises(SeppError, match=r"no label column 'y'.*label"):
        ParquetTableSource(str(path), image_column="pixels", label_column="y")
    with pytest.raises(SeppError, match="expected binary"):
        ParquetTableSource(str(path), image_column="label")
    write_parquet_table(tmp_path / "dup.parquet", 3, seed=14, id_column="uid")
    table = pq.read_table(tmp_path / "dup.parquet")
    uid = pa.array(["a", "b", "a"])
    pq.write_table(
        table.set_column(table.schema.get_field_index("uid"), "uid", uid), tmp_path / "dup.parquet"
    )
    with pytest.raises(SeppError, match="duplicate"):
        ParquetTableSource(str(tmp_path / "dup.parquet"), id_column="uid")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeppError, match=r"no \*\.parquet"):
        ParquetTableSource(str(tmp_path / "empty"))
    write_parquet_table(tmp_path / "mixed", 4, seed=15, n_files=2)
    pq.write_table(
        pq.read_table(tmp_path / "mixed" / "part-00001.parquet").drop(["label"]),
        tmp_path / "mixed" / "part-00001.parquet",
    )
    with pytest.raises(SeppError, match=r"part-00001.parquet.*lacks.*label"):
        ParquetTableSource(str(tmp_path / "mixed"))
    with pytest.raises(SeppError, match="out of range"):
        ParquetTableSource(str(path), image_column="pixels", class_names=["only"])


def test_parquet_fingerprint(tmp_path: Path) -> None:
    written = write_parquet_table(tmp_path / "t.parquet", 4, seed=16)
    a = ParquetTableSource(str(tmp_path / "t.parquet")).fingerprint()
    assert a == ParquetTableSource(str(tmp_path / "t.parquet")).fingerprint()
    table = pq.read_table(tmp_path / "t.parquet")
    changed = bytearray(written["encoded"][2])
    changed[-20] ^= 1
    images = table.column("image").to_pylist()
    images[2] = bytes(changed)
    pq.write_table(
        table.set_column(0, "image", pa.array(images, pa.binary())),
        tmp_path / "t.parquet",
        row_group_size=4,
    )
    assert ParquetTableSource(str(tmp_path / "t.parquet")).fingerprint() != a


def test_split_from_name() -> None:
    assert split_from_name("plain_text/train-00000-of-00001.parquet") == "train"
    assert split_from_name("validation.parquet") == "validation"
    assert split_from_name("test/part-0.parquet") == "test"
    assert split_from_name("trainer-0.parquet") is None
    assert split_from_name("part-0.parquet") is None


# ---- object storage -------------------------------------------------------------------------


def test_sources_read_from_s3(tmp_path: Path, bucket: str) -> None:
    """The same bytes through s3:// (the session's S3-compatible server): no local paths."""
    from sepp_ray.storage import filesystem

    write_cifar10(tmp_path / "c", 2, 2, seed=17)
    write_stl10(tmp_path / "s", 2, 2, 1, seed=18)
    write_parquet_table(tmp_path / "p" / "t.parquet", 5, seed=19)
    fs, root = filesystem(bucket)
    fs.put(str(tmp_path) + "/", root + "/data/", recursive=True)
    for local, remote in (
        (Cifar10Source(str(tmp_path / "c")), Cifar10Source(f"{bucket}/data/c")),
        (Stl10Source(str(tmp_path / "s")), Stl10Source(f"{bucket}/data/s")),
        (ParquetTableSource(str(tmp_path / "p")), ParquetTableSource(f"{bucket}/data/p")),
    ):
        a, b = read_all(local), read_all(remote)
        assert [i.key for i in a] == [i.key for i in b] and len(a) > 0
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(np.asarray(x.payload), np.asarray(y.payload))
            assert (x.label, x.split) == (y.label, y.split)
        assert b[0].origin.startswith(bucket)
        assert local.class_names() == remote.class_names()
        assert posixpath.basename(local.describe()["uri"]) == posixpath.basename(
            remote.describe()["uri"]
        )
    with pytest.raises(SeppError, match="data_batch_1"):
        Cifar10Source(f"{bucket}/data/s")


def test_tarball_is_reproducible(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "a", 1, 1, seed=20)
    md5_a = make_tarball(tmp_path / "a" / "cifar-10-batches-py", tmp_path / "a.tar.gz")
    md5_b = make_tarball(tmp_path / "a" / "cifar-10-batches-py", tmp_path / "b.tar.gz")
    assert md5_a == md5_b
    assert md5_a == hashlib.md5((tmp_path / "a.tar.gz").read_bytes()).hexdigest()
