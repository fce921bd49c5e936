"""An ImageFolder tree of JPEG/PNG files, local or on object storage.

Two layouts are recognised:
- ``root/<class>/<image>``: one split, "train";
- ``root/<split>/<class>/<image>`` where every top-level folder is a known split name
  (train, test, val, validation, unlabeled); images directly in ``root/<split>/`` are unlabeled.
Class names are the sorted union of class folder names over all splits (torchvision's order).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator
from typing import Any

from sepp_ray.data.sources.base import RawItem, WorkUnit, chunks
from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
SPLIT_NAMES = ("train", "test", "val", "validation", "unlabeled", "unlabelled")


class ImageFolderSource:
    """Files under ``root``; the work units are chunks of the sorted file list."""

    kind = "imagefolder"

    def __init__(self, root: str, chunk_size: int = 1000) -> None:
        self.root = root
        self.chunk_size = chunk_size
        fs, base = filesystem(root)
        if not fs.exists(base):
            raise SeppError(f"source {root} does not exist: check the path or URI")
        if not fs.isdir(base):
            raise SeppError(f"source {root} is a file, not an ImageFolder directory")
        entries = fs.find(base, withdirs=False, detail=True)
        # (relative path, size); hidden files and folders are ignored entirely
        files = sorted(
            (posixpath.relpath(p, base), int(info.get("size") or 0))
            for p, info in entries.items()
            if not any(part.startswith(".") for part in posixpath.relpath(p, base).split("/"))
        )
        self._base = base
        self._files: list[tuple[str, int, str, str | None]] = []  # rel, size, split, class
        self.ignored: list[tuple[str, str]] = []
        tops = {rel.split("/")[0] for rel, _ in files if "/" in rel}
        split_layout = bool(tops) and all(t.lower() in SPLIT_NAMES for t in tops)
        for rel, size in files:
            parts = rel.split("/")
            if split_layout:
                split = parts[0].lower()
                cls = parts[1] if len(parts) >= 3 else None
            else:
                split = "train"
                cls = parts[0] if len(parts) >= 2 else None
            if len(parts) == 1 and not split_layout:
                self.ignored.append((rel, "file at the top level, outside any class folder"))
                continue
            if split == "unlabelled":
                split = "unlabeled"
            self._files.append((rel, size, split, cls))
        if not self._files:
            raise SeppError(
                f"no files found under {root}: expected root/<class>/<image> or "
                "root/<split>/<class>/<image>"
            )
        self._classes = sorted({c for _, _, _, c in self._files if c is not None})
        self._class_index = {c: i for i, c in enumerate(self._classes)}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "uri": self.root, "files": len(self._files)}

    def class_names(self) -> list[str]:
        return list(self._classes)

    def units(self) -> list[WorkUnit]:
        return [
            {"files": [(rel, split, cls) for rel, _, split, cls in self._files[a:b]]}
            for a, b in chunks(len(self._files), self.chunk_size)
        ]

    def read_unit(self, unit: WorkUnit) -> Iterator[RawItem]:
        fs, _ = filesystem(self.root)
        for rel, split, cls in unit["files"]:
            path = posixpath.join(self._base, rel)
            label = self._class_index[cls] if cls is not None else None
            if not rel.lower().endswith(IMAGE_EXTENSIONS):
                # Still yielded so the skip is counted and logged with its path.
                ext = posixpath.splitext(rel)[1] or "(none)"
                yield RawItem(rel, path, b"", label, split, skip=f"not an image file: {ext}")
                continue
            with fs.open(path, "rb") as f:
                data = f.read()
            yield RawItem(rel, path, data, label, split)

    def split_names(self) -> set[str]:
        """The splits the tree holds, known before any image is read."""
        return {split for _, _, split, _ in self._files}

    def shuffle(self, seed: int) -> None:
        """A seeded order of the file list, so that every work unit (shard) mixes classes;
        the fingerprint does not depend on it."""
        import numpy as np

        order = np.random.default_rng(seed).permutation(len(self._files))
        self._files = [self._files[i] for i in order]

    def fingerprint(self) -> str:
        """Relative paths and sizes: cheap, and changes when files are added, removed or edited
        in size. (Hashing every byte of a large tree would cost as much as the ingest.)"""
        h = hashlib.sha256()
        for rel, size, _, _ in sorted(self._files):
            h.update(f"{rel}\0{size}\n".encode())
        return h.hexdigest()
