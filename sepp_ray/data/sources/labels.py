"""Labels that are not folder names, and the layout checks that keep a tree from being misread.

Many public benchmarks keep a split's images in one flat folder with an annotation file beside
it (Tiny ImageNet's ``val/images/`` + ``val/val_annotations.txt``, ImageNet's
``LOC_val_solution.csv``): read as an ImageFolder, the flat folder would become one class named
``images``. A label file here is CSV or TSV (or whitespace-separated), one image per row: a
path relative to the split folder (or just the file name), then the class; extra columns such
as boxes are ignored, and a header row is skipped.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from sepp_ray.errors import SeppError

LABEL_EXTENSIONS = (".csv", ".tsv", ".txt")
# a lone folder of this name inside a split holds its images, it is not a class
CONTAINER_NAMES = ("images", "imgs", "img", "jpegimages", "data")
# files that sit beside images in public datasets on purpose (boxes, captions, metadata)
EXPECTED_EXTRAS = (".txt", ".csv", ".tsv", ".xml", ".json", ".mat", ".md", ".yaml", ".yml")
EVAL_SPLITS = ("val", "test")
LAYOUT_CHECKS = ("strict", "warn")


def parse_label_text(text: str) -> list[tuple[str, str]]:
    """(image name, class) rows of a CSV/TSV/whitespace label file; extra columns dropped."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return []
    first = lines[0]
    if "\t" in first:
        rows = [ln.split("\t") for ln in lines]
    elif "," in first:
        rows = list(csv.reader(io.StringIO("\n".join(lines))))
    else:
        rows = [ln.split() for ln in lines]
    # ImageNet's LOC_val_solution.csv: "ImageId,PredictionString" with "n015 x y w h n015 ..."
    return [(r[0].strip(), r[1].strip().split()[0]) for r in rows if len(r) >= 2 and r[1].strip()]


def parse_splits_option(value: str, what: str) -> dict[str, str]:
    """``"val=val/labels.csv,test=t.csv"`` -> {"val": "val/labels.csv", ...}."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in value.split(",") if p.strip()):
        if "=" not in part:
            raise SeppError(
                f"{what}: {part!r} is not split=path (e.g. val=val/val_annotations.txt)"
            )
        split, path = part.split("=", 1)
        out[split.strip().lower()] = path.strip()
    return out


class ImageIndex:
    """Finds a split's image from the name a label file gives it: the path relative to the
    split folder, the file name alone, or either without its extension."""

    def __init__(self, inner_paths: Iterable[str]) -> None:
        self.by: dict[str, str | None] = {}
        for rel in inner_paths:
            base = posixpath.basename(rel)
            for key in (rel, base, posixpath.splitext(rel)[0], posixpath.splitext(base)[0]):
                # a name two images share is ambiguous: it matches neither
                self.by[key] = rel if self.by.get(key, rel) == rel else None

    def find(self, name: str) -> str | None:
        name = name.strip().lstrip("./")
        return self.by.get(name) or self.by.get(posixpath.splitext(name)[0])


@dataclass
class LabelMap:
    """A split's labels from its label file, by path relative to the split folder."""

    file: str
    labels: dict[str, str]
    unmatched_rows: int

    @classmethod
    def build(cls, file: str, text: str, index: ImageIndex) -> LabelMap:
        labels: dict[str, str] = {}
        unmatched = 0
        for i, (name, label) in enumerate(parse_label_text(text)):
            rel = index.find(name)
            if rel is None:
                unmatched += i > 0  # a first row naming no image is a header
                continue
            labels[rel] = label
        return cls(file, labels, unmatched)


def names_its_images(text: str, index: ImageIndex) -> bool:
    """A label file for this split: most of its rows name one of the split's images."""
    rows = parse_label_text(text)
    hits = sum(index.find(name) is not None for name, _ in rows)
    return hits > 0 and hits >= 0.5 * len(rows)


@dataclass
class SplitLayout:
    """What ImageFolderSource saw in one split, for the checks and the manifest."""

    name: str
    images: int = 0
    classes: Counter[str] = field(default_factory=Counter)
    unlabeled: int = 0
    label_file: str | None = None
    container: str | None = None  # a lone images/ folder read as flat
    extras: Counter[str] = field(default_factory=Counter)  # non-image files by extension

    def describe(self) -> str:
        where = f"{self.name}/{self.container + '/' if self.container else ''}"
        if self.label_file:
            how = f"labels from {self.label_file} ({len(self.classes)} classes)"
        elif self.classes:
            how = f"class folders {self.name}/<class>/ ({len(self.classes)} classes)"
        else:
            how = f"flat folder {where}<image>, no label file: unlabeled"
        extra = f", {self.unlabeled} unlabeled" if self.unlabeled and self.classes else ""
        return f"{self.name}: {self.images} images, {how}{extra}"


def _extra_kind(ext: str) -> str:
    return "expected beside images" if ext in EXPECTED_EXTRAS else "unexpected"


def layout_problems(splits: dict[str, SplitLayout]) -> tuple[list[str], list[str]]:
    """(problems that make labels wrong, warnings) for a tree read as ``splits``."""
    problems: list[str] = []
    warnings: list[str] = []
    labeled = {n: s for n, s in splits.items() if s.classes}
    widest = max((len(s.classes) for s in labeled.values()), default=0)
    for s in labeled.values():
        if len(s.classes) == 1 and widest > 1 and s.unlabeled == 0 and not s.label_file:
            (only,) = s.classes
            problems.append(
                f"split {s.name!r} has a single class folder {only!r} holding all its "
                f"{s.images} images, while another split has {widest} classes: it looks like a "
                f"flat folder of images, not a class. Give its labels with "
                f"source_options.label_files={s.name}=<file>, or ingest it unlabeled with "
                f"source_options.unlabeled_splits={s.name}"
            )
    train = labeled.get("train")
    for s in labeled.values():
        if train is None or s is train or len(s.classes) == 1:
            continue
        extra = sorted(set(s.classes) - set(train.classes))
        if extra:
            problems.append(
                f"split {s.name!r} has {len(extra)} classes that train lacks "
                f"({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}): its labels would "
                f"name classes no model was trained on. Check the folders, give "
                f"source_options.label_files={s.name}=<file>, or "
                f"source_options.unlabeled_splits={s.name}"
            )
        missing = sorted(set(train.classes) - set(s.classes))
        if missing:
            warnings.append(
                f"split {s.name!r} lacks {len(missing)} of train's {len(train.classes)} classes "
                f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); its accuracy "
                "covers the others only"
            )
    for s in splits.values():
        if s.label_file and s.unlabeled:
            warnings.append(
                f"split {s.name!r}: {s.unlabeled} images are not named in {s.label_file} and "
                "are ingested unlabeled"
            )
        if s.extras:
            kinds = ", ".join(
                f"{n} {ext} ({_extra_kind(ext)})" for ext, n in sorted(s.extras.items())
            )
            warnings.append(
                f"split {s.name!r}: non-image files left out: {kinds}"
                + ("" if all(e in EXPECTED_EXTRAS for e in s.extras) else "; check the folders")
            )
    return problems, warnings


def check_layout(root: str, splits: dict[str, SplitLayout], mode: str) -> list[str]:
    """Refuse (``strict``) or return as warnings (``warn``) what may be a misread tree;
    always returns the plain warnings."""
    if mode not in LAYOUT_CHECKS:
        raise SeppError(f"source_options.layout_check must be one of {LAYOUT_CHECKS}, got {mode!r}")
    problems, warnings = layout_problems(splits)
    if problems and mode == "strict":
        seen = "; ".join(s.describe() for s in splits.values())
        raise SeppError(
            f"{root} may be misread as an ImageFolder (layout seen: {seen}). "
            + " | ".join(problems)
            + ". (source_options.layout_check=warn ingests it as seen.)"
        )
    return problems + warnings
