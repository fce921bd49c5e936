"""An ImageFolder tree of JPEG/PNG files, local or on object storage.

Layouts recognised:
- ``root/<class>/<image>``: one split, "train";
- ``root/<split>/<class>/<image>`` where every top-level folder is a known split name
  (train, test, val, validation, unlabeled);
- a split (or the root) whose images sit flat, directly or in one ``images/`` folder: labeled
  by a label file (``source_options.label_files``, or the one file beside them that names its
  images, see ``labels.py``), else unlabeled.
Class names are the sorted union of class folder and label file names over all splits
(torchvision's order). Layouts that may be misread are refused before anything is read.
A class list (``source_options.classes``, e.g. ImageNet-100's) keeps only its classes, and
refuses a tree where a split lacks one of them.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Iterator
from typing import Any

from sepp_ray.data.classlists import ClassList
from sepp_ray.data.sources.base import RawItem, WorkUnit, chunks
from sepp_ray.data.sources.labels import (
    CONTAINER_NAMES,
    EXPECTED_EXTRAS,
    LABEL_EXTENSIONS,
    ImageIndex,
    LabelMap,
    SplitLayout,
    check_layout,
    names_its_images,
)
from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
SPLIT_NAMES = ("train", "test", "val", "validation", "unlabeled", "unlabelled")


def _is_image(rel: str) -> bool:
    return rel.lower().endswith(IMAGE_EXTENSIONS)


class ImageFolderSource:
    """Files under ``root``; the work units are chunks of the sorted file list."""

    kind = "imagefolder"

    def __init__(
        self,
        root: str,
        chunk_size: int = 1000,
        label_files: dict[str, str] | None = None,
        unlabeled_splits: tuple[str, ...] = (),
        layout_check: str = "strict",
        classes: ClassList | None = None,
    ) -> None:
        self.root = root
        self.chunk_size = chunk_size
        self.label_files = dict(label_files or {})
        # `classes`: keep only these classes' images (a benchmark subset such as ImageNet-100)
        self.class_filter = classes
        self._keep = frozenset(classes.classes) if classes else None
        self.excluded = 0  # images of classes outside the filter, left out
        self.unlabeled_splits = tuple(s.lower() for s in unlabeled_splits)
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
        self._label_sizes: list[tuple[str, int]] = []  # label files read (for the fingerprint)
        self.ignored: list[tuple[str, str]] = []
        tops = {rel.split("/")[0] for rel, _ in files if "/" in rel}
        split_layout = bool(tops) and all(t.lower() in SPLIT_NAMES for t in tops)
        groups: dict[str, tuple[str, list[tuple[str, int]]]] = {}  # split -> (prefix, inner)
        for rel, size in files:
            if split_layout:
                top, _, inner = rel.partition("/")
                if not inner:
                    self.ignored.append((rel, "file at the top level, outside any split folder"))
                    continue
                split = top.lower()
                split = "unlabeled" if split == "unlabelled" else split
                groups.setdefault(split, (top + "/", []))[1].append((inner, size))
            else:
                groups.setdefault("train", ("", []))[1].append((rel, size))
        unknown = set(self.label_files) - set(groups)
        if unknown:
            raise SeppError(
                f"source_options.label_files names splits {sorted(unknown)} that {root} lacks "
                f"(splits: {sorted(groups)})"
            )
        self.layout: dict[str, SplitLayout] = {}
        for split, (prefix, listed) in sorted(groups.items()):
            self.layout[split] = self._read_split(fs, split, prefix, listed, split_layout)
        if classes is not None:
            self._check_class_filter(classes)
        if not self._files:
            raise SeppError(
                f"no files found under {root}: expected root/<class>/<image> or "
                "root/<split>/<class>/<image>"
            )
        self._classes = sorted({c for _, _, _, c in self._files if c is not None})
        self._class_index = {c: i for i, c in enumerate(self._classes)}
        self.warnings = check_layout(root, self.layout, layout_check)
        for w in self.warnings:
            log.warning("%s: %s", root, w)

    def _read_split(
        self, fs: Any, split: str, prefix: str, inner: list[tuple[str, int]], split_layout: bool
    ) -> SplitLayout:
        """Label the files of one split (``inner``: paths relative to its folder)."""
        lay = SplitLayout(split)
        images = [rel for rel, _ in inner if _is_image(rel)]
        labels = self._label_map(fs, split, prefix, inner, images)
        label_file = labels.file if labels else None  # relative to the root
        if labels is not None:
            lay.label_file = labels.file
            if labels.unmatched_rows:
                n = labels.unmatched_rows
                log.warning("%s: %d rows name no image of split %r", lay.label_file, n, split)
        folders = {rel.split("/")[0] for rel in images if "/" in rel}
        flat = {rel.split("/")[0] for rel in images if "/" not in rel}
        if len(folders) == 1 and not flat and next(iter(folders)).lower() in CONTAINER_NAMES:
            lay.container = next(iter(folders))
        for rel, size in inner:
            parts = rel.split("/")
            top_level = len(parts) == 1
            if prefix + rel == label_file:
                continue
            if top_level and not _is_image(rel):
                if not split_layout or rel.lower().endswith(LABEL_EXTENSIONS):
                    self.ignored.append((prefix + rel, "not an image, beside the image folders"))
                    continue
            elif top_level and not split_layout and labels is None:
                self.ignored.append((rel, "file at the top level, outside any class folder"))
                continue
            if labels is not None:
                cls = labels.labels.get(rel)
            elif split in self.unlabeled_splits or lay.container or top_level:
                cls = None
            else:
                cls = parts[0]
            if self._keep is not None and cls is not None and cls not in self._keep:
                self.excluded += _is_image(rel)
                continue
            if not _is_image(rel):
                lay.extras[posixpath.splitext(rel)[1].lower() or "(none)"] += 1
            else:
                lay.images += 1
                if cls is None:
                    lay.unlabeled += 1
                else:
                    lay.classes[cls] += 1
            self._files.append((prefix + rel, size, split, cls))
        return lay

    def _label_map(
        self, fs: Any, split: str, prefix: str, inner: list[tuple[str, int]], images: list[str]
    ) -> LabelMap | None:
        """The split's labels: the given label file, else the one text file beside its images
        that names them, else None. (The name index is built only when there is a file to
        match: ImageNet's train split has none and 1.28 M images.)"""
        given = self.label_files.get(split)
        if given is not None:
            index = ImageIndex(images)
            rel = posixpath.normpath(given).lstrip("/")
            path = posixpath.join(self._base, rel)
            if not fs.isfile(path):
                raise SeppError(
                    f"label file {given!r} for split {split!r} not found under {self.root}: "
                    "give a path relative to the source root"
                )
            labels = LabelMap.build(rel, self._read_text(fs, path, rel), index)
            if not labels.labels:
                raise SeppError(
                    f"label file {given!r} names none of split {split!r}'s images: its first "
                    "column must be image paths relative to the split folder, or file names"
                )
            return labels
        if split in self.unlabeled_splits:
            return None
        candidates = [
            (rel, size)
            for rel, size in inner
            if "/" not in rel and rel.lower().endswith(LABEL_EXTENSIONS) and size < 64 << 20
        ]
        found = []
        index = ImageIndex(images if candidates else [])
        for rel, _ in candidates:
            text = self._read_text(fs, posixpath.join(self._base, prefix + rel), prefix + rel)
            if names_its_images(text, index):
                found.append(LabelMap.build(prefix + rel, text, index))
        if len(found) > 1:
            raise SeppError(
                f"split {split!r} of {self.root} holds {len(found)} files that name its images "
                f"({', '.join(f.file for f in found)}): choose one with "
                f"source_options.label_files={split}=<file>"
            )
        return found[0] if found else None

    def _check_class_filter(self, classes: ClassList) -> None:
        """Refuse a tree the filter cannot select from: unlabeled images (they belong to no
        listed class), or a split lacking a listed class (a partial download, or class folders
        named otherwise than the list): training on part of a subset is another benchmark."""
        for split, lay in sorted(self.layout.items()):
            if lay.unlabeled:
                raise SeppError(
                    f"source_options.classes={classes.name} keeps images by class, but split "
                    f"{split!r} of {self.root} has {lay.unlabeled} unlabeled images: remove "
                    "that split's folder, or ingest without the class filter"
                )
            missing = [c for c in classes.classes if c not in lay.classes]
            if missing:
                more = " ..." if len(missing) > 5 else ""
                raise SeppError(
                    f"split {split!r} of {self.root} lacks {len(missing)} of the "
                    f"{len(classes.classes)} classes of class list {classes.name} "
                    f"({', '.join(missing[:5])}{more}): check that the tree is complete (a "
                    "partial download?) and that its class folders are named as the list names "
                    "them, or give another list"
                )

    def _read_text(self, fs: Any, path: str, rel: str) -> str:
        with fs.open(path, "rb") as f:
            data: bytes = f.read()
        self._label_sizes.append((rel, len(data)))
        return data.decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "uri": self.root,
            "files": len(self._files),
            "layout": {n: lay.describe() for n, lay in self.layout.items()},
            "label_files": {n: lay.label_file for n, lay in self.layout.items() if lay.label_file},
            "unlabeled_splits": list(self.unlabeled_splits),
            # only with a filter: without one the description (and stage hashes) stay as they were
            **({"classes": self.class_filter.name} if self.class_filter else {}),
        }

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
                ext = posixpath.splitext(rel)[1].lower() or "(none)"
                kind = "expected beside images" if ext in EXPECTED_EXTRAS else "unexpected"
                yield RawItem(
                    rel, path, b"", label, split, skip=f"not an image file: {ext} ({kind})"
                )
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
        # labels that are not folder names change with the label files and these options
        for rel, size in sorted(self._label_sizes):
            h.update(f"label {rel}\0{size}\n".encode())
        if self.unlabeled_splits:
            h.update(f"unlabeled {sorted(self.unlabeled_splits)}".encode())
        if self._keep is not None:
            h.update(f"classes {sorted(self._keep)}".encode())
        return h.hexdigest()
