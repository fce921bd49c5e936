"""STL-10 in its binary layout (Coates, Lee & Ng, AISTATS 2011).

``stl10_binary/``: ``train_X.bin``, ``train_y.bin``, ``test_X.bin``, ``test_y.bin``,
``unlabeled_X.bin`` (100,000 images, 2.7 GB) and ``class_names.txt``. Each image is 3 x 96 x 96
uint8, channel-major and *column-major* within a channel (a MATLAB export); labels are one uint8
each, 1..10. Work units are byte ranges, read with a seek: no process ever loads a whole file.
``root`` is ``stl10_binary`` or its parent; the ``.tar.gz`` is refused with a hint (a gzip
stream cannot be seeked).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sepp_ray.data.download import digest_file, refuse_archive
from sepp_ray.data.sources.base import RawItem, WorkUnit, chunks
from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem

SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
FOLDER = "stl10_binary"
CLASS_FILE = "class_names.txt"
SPLIT_FILES: dict[str, tuple[str, str | None]] = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}
# Files at least this big are fingerprinted by size + first and last MiB (train_X is 138 MB,
# test_X 221 MB, unlabeled_X 2.7 GB): hashing them whole would cost a full read per ingest.
FULL_HASH_BELOW = 64 << 20


class Stl10Source:
    """The requested STL-10 splits; the unlabeled split has label None."""

    kind = "stl10"

    def __init__(
        self,
        root: str,
        splits: Sequence[str] = ("train", "test", "unlabeled"),
        chunk_size: int = 1000,
    ) -> None:
        splits = tuple(splits)
        bad = [s for s in splits if s not in SPLIT_FILES]
        if bad or not splits or len(set(splits)) != len(splits):
            raise SeppError(
                f"stl10 splits {list(splits)} are invalid: give distinct names among "
                f"{', '.join(SPLIT_FILES)}"
            )
        if chunk_size < 1:
            raise SeppError(f"chunk_size must be at least 1, got {chunk_size}")
        self.root = str(root)
        self.splits = splits
        self.chunk_size = chunk_size
        fs, path = filesystem(self.root)
        refuse_archive(self.root, path, "stl10")
        if not fs.exists(path):
            raise SeppError(f"stl10 source {self.root} does not exist: check the path/URI")
        if not fs.isdir(path):
            raise SeppError(f"stl10 source {self.root} is a file: pass the stl10_binary folder")
        self._sub = FOLDER if fs.isdir(posixpath.join(path, FOLDER)) else ""
        self._dir = posixpath.join(path, self._sub) if self._sub else path
        sizes = {
            posixpath.basename(p["name"].rstrip("/")): int(p.get("size") or 0)
            for p in fs.ls(self._dir, detail=True)
        }
        labeled = any(SPLIT_FILES[s][1] for s in splits)
        expected = [f for s in splits for f in SPLIT_FILES[s] if f] + [CLASS_FILE] * labeled
        missing = [f for f in expected if f not in sizes]
        if missing:
            raise SeppError(
                f"stl10 source {self.root} lacks {', '.join(missing)}: expected the binary "
                f"layout ({', '.join(expected)}) in {self.root} or {self.root}/{FOLDER}; found "
                f"{sorted(sizes)[:12]}. Extract stl10_binary.tar.gz, or choose other splits"
            )
        self._counts: dict[str, int] = {}
        for s in splits:
            x_name, y_name = SPLIT_FILES[s]
            n, rest = divmod(sizes[x_name], IMAGE_BYTES)
            if rest:
                raise SeppError(
                    f"{self._origin(x_name)} holds {sizes[x_name]} bytes, not a multiple of "
                    f"{IMAGE_BYTES} (one 3x96x96 image): the file is truncated; extract it again"
                )
            if y_name and sizes[y_name] != n:
                raise SeppError(
                    f"{self._origin(y_name)} holds {sizes[y_name]} labels for {n} images in "
                    f"{x_name}: the files do not match; extract them again"
                )
            self._counts[s] = n
        self._has_names = CLASS_FILE in sizes
        self._classes: list[str] | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "uri": self.root,
            "splits": list(self.splits),
            "chunk_size": self.chunk_size,
        }

    def class_names(self) -> list[str]:
        if not self._has_names:
            return []
        if self._classes is None:
            fs, _ = filesystem(self.root)
            with fs.open(posixpath.join(self._dir, CLASS_FILE), "rb") as f:
                text = f.read().decode("utf-8")
            self._classes = [line.strip() for line in text.splitlines() if line.strip()]
        return list(self._classes)

    def units(self) -> list[WorkUnit]:
        return [
            {"split": s, "start": a, "stop": b}
            for s in self.splits
            for a, b in chunks(self._counts[s], self.chunk_size)
        ]

    def read_unit(self, unit: WorkUnit) -> Iterator[RawItem]:
        split, start, stop = unit["split"], unit["start"], unit["stop"]
        x_name, y_name = SPLIT_FILES[split]
        raw = self._read_range(x_name, start * IMAGE_BYTES, (stop - start) * IMAGE_BYTES)
        # raw: N x C x W x H (column-major planes) -> N x H x W x C
        images = np.frombuffer(raw, np.uint8).reshape(-1, 3, SIDE, SIDE).transpose(0, 3, 2, 1)
        images = np.ascontiguousarray(images)
        labels: list[int | None] = [None] * (stop - start)
        if y_name:
            y = np.frombuffer(self._read_range(y_name, start, stop - start), np.uint8)
            n_classes = len(self.class_names())
            bad = np.flatnonzero((y < 1) | (y > n_classes))
            if bad.size:
                i = start + int(bad[0])
                raise SeppError(
                    f"{self._origin(y_name)}#{i}: label {int(y[bad[0]])} is outside 1..{n_classes}"
                    " (STL-10 labels are 1-based): the file is damaged; extract it again"
                )
            labels = [int(v) - 1 for v in y]
        origin = self._origin(x_name)
        for i in range(stop - start):
            yield RawItem(
                key=f"stl10/{split}/{start + i}",
                origin=f"{origin}#{start + i}",
                payload=images[i],
                label=labels[i],
                split=split,
            )

    def fingerprint(self) -> str:
        """sha256 of each file of the chosen splits: whole for small files, size + first and
        last MiB for files of FULL_HASH_BELOW bytes or more (see ``digest_file``)."""
        fs, _ = filesystem(self.root)
        h = hashlib.sha256(f"{self.kind}\n{list(self.splits)}\n".encode())
        names = [f for s in self.splits for f in SPLIT_FILES[s] if f]
        if self._has_names:
            names.append(CLASS_FILE)
        for name in names:
            h.update(f"{name}\n".encode())
            digest_file(fs, posixpath.join(self._dir, name), h, full_below=FULL_HASH_BELOW)
        return h.hexdigest()

    def _origin(self, name: str) -> str:
        return posixpath.join(self.root.rstrip("/"), self._sub, name)

    def _read_range(self, name: str, offset: int, length: int) -> bytes:
        fs, _ = filesystem(self.root)
        with fs.open(posixpath.join(self._dir, name), "rb") as f:
            f.seek(offset)
            data = bytes(f.read(length))
        if len(data) != length:
            raise SeppError(
                f"{self._origin(name)}: read {len(data)} of {length} bytes at offset {offset}; "
                "the file changed or is truncated: extract it again"
            )
        return data
