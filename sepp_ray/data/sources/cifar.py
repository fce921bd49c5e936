"""CIFAR-10 and CIFAR-100 in their "python version" layout (Krizhevsky, 2009).

CIFAR-10: ``data_batch_1..5`` (train), ``test_batch``, ``batches.meta``; CIFAR-100: ``train``,
``test``, ``meta``. Each batch is a pickle (protocol 2, written by Python 2, so keys arrive as
bytes) of a dict whose ``data`` is N x 3072 uint8: the R, G and B planes of a 32x32 image, each
row-major. ``root`` is that folder or its parent; the ``.tar.gz`` itself is refused with a hint
(a pickle cannot be read in slices, so reading through the gzip stream would decompress the
archive once per work unit).

Pickles can run code when loaded, and a URI may point at anyone's bucket: batches are loaded
with an unpickler that only resolves the few numpy names an array needs. A batch must be
loaded whole to read any slice of it, so the last batch loaded is kept per process: the work
units of one file, run one after another by a worker, then load it once.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import posixpath
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from sepp_ray.data.download import digest_file, refuse_archive
from sepp_ray.data.sources.base import RawItem, WorkUnit, chunks
from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only what a dict of numpy arrays, lists, ints and bytes needs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def load_pickle(data: bytes, origin: str) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (Python 2 pickles give bytes keys)."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any failure here means "not a CIFAR pickle"
        raise SeppError(
            f"{origin} is not a CIFAR python-version pickle ({type(e).__name__}: {e}): "
            "download the 'python version' archive (cifar-*-python.tar.gz)"
        ) from e
    if not isinstance(obj, dict):
        raise SeppError(f"{origin} holds a {type(obj).__name__}, not a CIFAR batch dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


_cache_lock = threading.Lock()
_cache: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}


class _CifarSource:
    """Shared reader; subclasses name the files and the label field."""

    kind = ""
    folder = ""  # the folder inside the official archive
    archive = ""
    split_files: dict[str, tuple[str, ...]] = {}
    meta_file = ""

    def __init__(self, root: str, chunk_size: int = 1000) -> None:
        if chunk_size < 1:
            raise SeppError(f"chunk_size must be at least 1, got {chunk_size}")
        self.root = str(root)
        self.chunk_size = chunk_size
        fs, path = filesystem(self.root)
        refuse_archive(self.root, path, self.kind)
        if not fs.exists(path):
            raise SeppError(f"{self.kind} source {self.root} does not exist: check the path/URI")
        if not fs.isdir(path):
            raise SeppError(f"{self.kind} source {self.root} is a file: pass the folder")
        sub = posixpath.join(path, self.folder)
        self._sub = self.folder if fs.isdir(sub) else ""
        self._dir = sub if self._sub else path
        names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(self._dir, detail=False)}
        expected = [*self._files(), self.meta_file]
        missing = [f for f in expected if f not in names]
        if missing:
            hint = (
                f"; {self.archive} is there: extract it (tar xzf {self.archive})"
                if self.archive in names
                else ""
            )
            raise SeppError(
                f"{self.kind} source {self.root} lacks {', '.join(missing)}: expected the "
                f"python-version layout ({', '.join(expected)}) in {self.root} or "
                f"{self.root}/{self.folder}; found {sorted(names)[:12]}{hint}"
            )
        self._counts: dict[str, int] | None = None
        self._classes: list[str] | None = None

    # ---- subclass hooks
    def _label_field(self) -> str:
        raise NotImplementedError

    def _names_field(self) -> str:
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        return {}

    # ---- Source
    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "uri": self.root,
            "chunk_size": self.chunk_size,
            **self._options(),
        }

    def class_names(self) -> list[str]:
        if self._classes is None:
            meta = load_pickle(self._read(self.meta_file), self._origin(self.meta_file))
            field = self._names_field()
            if field not in meta:
                raise SeppError(
                    f"{self._origin(self.meta_file)} has no {field!r}: not a {self.kind} meta file"
                )
            self._classes = [
                n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[field]
            ]
        return list(self._classes)

    def units(self) -> list[WorkUnit]:
        if self._counts is None:
            self._counts = {name: len(self._batch(name)[1]) for name in self._files()}
        return [
            {"split": split, "file": name, "start": a, "stop": b}
            for split, files in self.split_files.items()
            for name in files
            for a, b in chunks(self._counts[name], self.chunk_size)
        ]

    def read_unit(self, unit: WorkUnit) -> Iterator[RawItem]:
        split, name, start, stop = unit["split"], unit["file"], unit["start"], unit["stop"]
        data, labels = self._batch(name)
        # data rows: R plane, G plane, B plane, each 32x32 row-major -> N x 32 x 32 x 3
        images = np.ascontiguousarray(data[start:stop].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        origin = self._origin(name)
        for i in range(stop - start):
            yield RawItem(
                key=f"{self.kind}/{split}/{name}/{start + i}",
                origin=f"{origin}#{start + i}",
                payload=images[i],
                label=int(labels[start + i]),
                split=split,
            )

    def fingerprint(self) -> str:
        """sha256 of every batch and the meta file, byte for byte (about 180 MB)."""
        fs, _ = filesystem(self.root)
        h = hashlib.sha256(f"{self.kind}\n{self._options()}\n".encode())
        for name in (*self._files(), self.meta_file):
            h.update(f"{name}\n".encode())
            digest_file(fs, posixpath.join(self._dir, name), h)
        return h.hexdigest()

    # ---- internals
    def _files(self) -> list[str]:
        return [name for files in self.split_files.values() for name in files]

    def _origin(self, name: str) -> str:
        return posixpath.join(self.root.rstrip("/"), self._sub, name)

    def _read(self, name: str) -> bytes:
        fs, _ = filesystem(self.root)
        with fs.open(posixpath.join(self._dir, name), "rb") as f:
            return bytes(f.read())

    def _batch(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(data N x 3072 uint8, labels N) of one batch file, through the one-entry cache."""
        fs, _ = filesystem(self.root)
        # ukey: size and mtime (local) or ETag (S3), so a rewritten file is never served stale
        key = (self._origin(name), fs.ukey(posixpath.join(self._dir, name)), self._label_field())
        with _cache_lock:
            hit = _cache.get(key)
        if hit is not None:
            return hit
        origin = self._origin(name)
        batch = load_pickle(self._read(name), origin)
        field = self._label_field()
        if "data" not in batch or field not in batch:
            raise SeppError(
                f"{origin} has keys {sorted(batch)}, expected 'data' and {field!r}: "
                f"not a {self.kind} batch"
            )
        data = np.asarray(batch["data"])
        labels = np.asarray(batch[field], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise SeppError(f"{origin}: data is {data.dtype} {data.shape}, expected uint8 N x 3072")
        if labels.shape != (data.shape[0],):
            raise SeppError(f"{origin}: {labels.shape} labels for {data.shape[0]} images")
        with _cache_lock:
            _cache.clear()
            _cache[key] = (data, labels)
        return data, labels


class Cifar10Source(_CifarSource):
    """CIFAR-10: 50,000 train and 10,000 test images of 10 classes."""

    kind = "cifar10"
    folder = "cifar-10-batches-py"
    archive = "cifar-10-python.tar.gz"
    split_files = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
    meta_file = "batches.meta"

    def _label_field(self) -> str:
        return "labels"

    def _names_field(self) -> str:
        return "label_names"


class Cifar100Source(_CifarSource):
    """CIFAR-100 with its 100 fine or 20 coarse labels."""

    kind = "cifar100"
    folder = "cifar-100-python"
    archive = "cifar-100-python.tar.gz"
    split_files = {"train": ("train",), "test": ("test",)}
    meta_file = "meta"

    def __init__(self, root: str, label_kind: str = "fine", chunk_size: int = 1000) -> None:
        if label_kind not in ("fine", "coarse"):
            raise SeppError(f"label_kind must be 'fine' or 'coarse', got {label_kind!r}")
        self.label_kind = label_kind
        super().__init__(root, chunk_size)

    def _label_field(self) -> str:
        return f"{self.label_kind}_labels"

    def _names_field(self) -> str:
        return f"{self.label_kind}_label_names"

    def _options(self) -> dict[str, Any]:
        return {"label_kind": self.label_kind}
