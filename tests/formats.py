"""Tiny datasets written in the real on-disk formats (CIFAR python pickles, STL-10 binary,
Parquet tables, gzip tarballs), for tests of the sources, ingest and download.

Each writer returns what it wrote, so a test compares pixels and labels read back with the
truth. Images are smooth random waves plus a little noise: not constant, with structure an
encoder can see.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
STL10_CLASSES = [
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
]


def smooth_images(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """N x H x W x 3 uint8: a random plane wave per channel plus mild noise."""
    y = np.linspace(0.0, 1.0, h)[None, :, None, None]
    x = np.linspace(0.0, 1.0, w)[None, None, :, None]
    fy, fx = rng.uniform(-2.0, 2.0, (2, n, 1, 1, 3))
    phase = rng.uniform(0.0, 2 * np.pi, (n, 1, 1, 3))
    wave = 0.5 + 0.4 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
    img = wave + 0.05 * rng.standard_normal((n, h, w, 3))
    return np.clip(img * 255.0, 0, 255).astype(np.uint8)


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]


_PurePickler: Any = pickle._Pickler  # type: ignore[attr-defined]  # the Python one: hookable


class _Py2Pickler(_PurePickler):
    """Protocol 2 as Python 2 + numpy 1 wrote it: bytes as py2 ``str`` opcodes (so loading
    with encoding="bytes" gives bytes and "latin1" gives str, as with the real files) and
    arrays rebuilt by ``numpy.core.multiarray._reconstruct``."""

    dispatch = _PurePickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _cifar_pickle(path: Path, fields: dict[str, Any], str_keys: bool) -> None:
    """The py2 layout; ``str_keys``: str keys, as a pickle re-saved by Python 3."""
    obj = {(k if str_keys else k.encode()): v for k, v in fields.items()}
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 -> N x 3072: R plane, G plane, B plane, each row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def write_cifar10(
    root: str | os.PathLike[str],
    n_train_per_batch: int = 6,
    n_test: int = 5,
    seed: int = 0,
    *,
    str_keys: bool = False,
) -> dict[str, Any]:
    """``root/cifar-10-batches-py/`` as in the official archive.

    Returns {"dir", "class_names", "batches": {file: {"split", "images" N x 32 x 32 x 3,
    "labels" N}}}. ``str_keys`` writes str dict keys (a pickle re-saved by Python 3).
    """
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    files = [
        (f"data_batch_{i}", "train", n_train_per_batch, f"training batch {i} of 5")
        for i in range(1, 6)
    ]
    files.append(("test_batch", "test", n_test, "testing batch 1 of 1"))
    batches: dict[str, Any] = {}
    for name, split, n, batch_label in files:
        images = smooth_images(rng, n, 32, 32)
        labels = rng.integers(0, 10, n)
        fields = {
            "batch_label": batch_label.encode(),
            "labels": [int(v) for v in labels],
            "data": _cifar_rows(images),
            "filenames": [f"{name}_{i:05d}.png".encode() for i in range(n)],
        }
        _cifar_pickle(d / name, fields, str_keys)
        batches[name] = {"split": split, "images": images, "labels": labels}
    meta = {
        "num_cases_per_batch": n_train_per_batch,
        "label_names": [c.encode() for c in CIFAR10_CLASSES],
        "num_vis": 3072,
    }
    _cifar_pickle(d / "batches.meta", meta, str_keys)
    return {"dir": str(d), "class_names": list(CIFAR10_CLASSES), "batches": batches}


def write_cifar100(
    root: str | os.PathLike[str], n_train: int = 12, n_test: int = 6, seed: int = 0
) -> dict[str, Any]:
    """``root/cifar-100-python/`` (train, test, meta) as in the official archive.

    Returns {"dir", "fine_names" (100), "coarse_names" (20), "batches": {file: {"split",
    "images", "fine", "coarse"}}}.
    """
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    fine_names = [f"fine_{i:03d}" for i in range(100)]
    coarse_names = [f"coarse_{i:02d}" for i in range(20)]
    batches: dict[str, Any] = {}
    for name, n in (("train", n_train), ("test", n_test)):
        images = smooth_images(rng, n, 32, 32)
        fine = rng.integers(0, 100, n)
        coarse = fine // 5
        fields = {
            "filenames": [f"{name}_{i:05d}.png".encode() for i in range(n)],
            "batch_label": f"{name}ing batch 1 of 1".encode(),
            "fine_labels": [int(v) for v in fine],
            "coarse_labels": [int(v) for v in coarse],
            "data": _cifar_rows(images),
        }
        _cifar_pickle(d / name, fields, str_keys=False)
        batches[name] = {"split": name, "images": images, "fine": fine, "coarse": coarse}
    meta = {
        "fine_label_names": [c.encode() for c in fine_names],
        "coarse_label_names": [c.encode() for c in coarse_names],
    }
    _cifar_pickle(d / "meta", meta, str_keys=False)
    return {
        "dir": str(d),
        "fine_names": fine_names,
        "coarse_names": coarse_names,
        "batches": batches,
    }


def stl10_bytes(images: np.ndarray) -> bytes:
    """N x 96 x 96 x 3 -> STL-10 bytes: per image 3 planes, each column-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()


def write_stl10(
    root: str | os.PathLike[str],
    n_train: int = 5,
    n_test: int = 4,
    n_unlabeled: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """``root/stl10_binary/`` as in the official archive.

    Returns {"dir", "class_names", "images": {split: N x 96 x 96 x 3}, "labels": {split: 0-based
    N, or None for unlabeled}}.
    """
    rng = np.random.default_rng(seed)
    d = Path(root) / "stl10_binary"
    d.mkdir(parents=True, exist_ok=True)
    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray | None] = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        images[split] = smooth_images(rng, n, 96, 96)
        (d / f"{split}_X.bin").write_bytes(stl10_bytes(images[split]))
        if split == "unlabeled":
            labels[split] = None
            continue
        y = rng.integers(0, 10, n)
        labels[split] = y
        (d / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
    (d / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")
    return {"dir": str(d), "class_names": list(STL10_CLASSES), "images": images, "labels": labels}


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet_table(
    path: str | os.PathLike[str],
    n_rows: int = 10,
    seed: int = 0,
    *,
    n_files: int = 1,
    file_names: list[str] | None = None,
    row_group_size: int = 4,
    image_column: str = "image",
    struct_image: bool = False,
    label_column: str | None = "label",
    string_labels: bool = False,
    n_classes: int = 3,
    split_column: str | None = None,
    id_column: str | None = None,
    extra_binary_column: str | None = None,
    hf_class_names: list[str] | None = None,
    size: int = 16,
) -> dict[str, Any]:
    """A table of PNG-encoded images.

    ``n_files == 1`` and no ``file_names``: ``path`` is the file; otherwise ``path`` is a folder
    of ``file_names`` (default ``part-00000.parquet`` ...), rows dealt out in order.
    ``struct_image``: the Hugging Face Image layout (struct of bytes, path);
    ``hf_class_names``: int labels with Hugging Face ClassLabel names in the schema metadata.
    Returns {"files": [path], "rows": [per file, the row indices of the whole table],
    "images", "encoded", "labels" (int or str), "splits", "ids"}.
    """
    rng = np.random.default_rng(seed)
    images = smooth_images(rng, n_rows, size, size)
    encoded = [png_bytes(im) for im in images]
    label_ids = rng.integers(0, n_classes, n_rows)
    labels: list[Any] = [f"class_{v}" for v in label_ids] if string_labels else label_ids.tolist()
    splits = [("train", "test")[int(v)] for v in rng.integers(0, 2, n_rows)]
    ids = [f"img-{int(v)}" for v in rng.permutation(10 * n_rows)[:n_rows]]
    cols: dict[str, Any] = {}
    if struct_image:
        cols[image_column] = pa.array(
            [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(encoded)],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    else:
        cols[image_column] = pa.array(encoded, pa.binary())
    if label_column:
        cols[label_column] = pa.array(labels)
    if split_column:
        cols[split_column] = pa.array(splits)
    if id_column:
        cols[id_column] = pa.array(ids)
    if extra_binary_column:
        cols[extra_binary_column] = pa.array([b"x"] * n_rows, pa.binary())
    table = pa.table(cols)
    if hf_class_names is not None and label_column:
        features = {label_column: {"names": hf_class_names, "_type": "ClassLabel"}}
        meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
        table = table.replace_schema_metadata(meta)

    out = Path(path)
    if n_files == 1 and file_names is None:
        targets = [out]
        out.parent.mkdir(parents=True, exist_ok=True)
    else:
        names = file_names or [f"part-{i:05d}.parquet" for i in range(n_files)]
        targets = [out / name for name in names]
    bounds = np.linspace(0, n_rows, len(targets) + 1).astype(int)
    rows = []
    for target, a, b in zip(targets, bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(a, b - a), target, row_group_size=row_group_size)
        rows.append(list(range(a, b)))
    return {
        "files": [str(t) for t in targets],
        "rows": rows,
        "images": images,
        "encoded": encoded,
        "labels": labels,
        "splits": splits,
        "ids": ids,
    }


def make_tarball(src_dir: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> str:
    """Write ``src_dir`` as ``out_path`` (.tar.gz, top folder = the name of ``src_dir``, as the
    official archives are laid out), byte-for-byte reproducible; returns its md5."""
    src = Path(src_dir)
    with (
        open(out_path, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz,
    ):
        with tarfile.open(fileobj=gz, mode="w") as tar:
            for p in [src, *sorted(src.rglob("*"))]:
                info = tar.gettarinfo(
                    str(p), arcname=(Path(src.name) / p.relative_to(src)).as_posix()
                )
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if p.is_file():
                    with open(p, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return hashlib.md5(Path(out_path).read_bytes(), usedforsecurity=False).hexdigest()
