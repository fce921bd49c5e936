"""Image sources, and how a SOURCE argument is turned into one."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass

from sepp_ray.config import opt
from sepp_ray.data.sources.base import RawItem, Source, WorkUnit, image_id
from sepp_ray.errors import SeppError
from sepp_ray.registry import Registry
from sepp_ray.storage import check_reachable, filesystem

__all__ = [
    "RawItem",
    "Source",
    "WorkUnit",
    "image_id",
    "SourceOptions",
    "open_source",
    "FORMATS",
    "SOURCES",
]

BUILTIN = ("digits", "synthetic")
DOWNLOADABLE = ("cifar10", "cifar100", "stl10")


@dataclass(frozen=True)
class SourceOptions:
    """Options of the individual source kinds (each ignores what is not its own)."""

    size: int = opt(32, "digits, synthetic: image side in pixels")
    n: int = opt(1000, "synthetic: number of images")
    seed: int = opt(0, "digits, synthetic: seed of the train/test split and of the images")
    test_fraction: float = opt(0.2, "digits, synthetic: share of images in the test split")
    cifar100_labels: str = opt("fine", "cifar100: 'fine' (100 classes) or 'coarse' (20)")
    stl10_splits: str = opt("train,test,unlabeled", "stl10: comma-separated splits to read")
    image_column: str | None = opt(None, "parquet: image column (auto-detected when unset)")
    label_column: str | None = opt(None, "parquet: label column (auto: label/labels)")
    split_column: str | None = opt(
        None,
        "parquet: split column (default: a 'split' column, else the "
        "split in the file name, e.g. train-0000.parquet, else 'train')",
    )
    id_column: str | None = opt(None, "parquet: column of stable ids (default: file#row)")
    download_root: str = opt(
        "~/.cache/sepp-ray/datasets",
        "where SOURCE=cifar10|cifar100|stl10 is downloaded when no such path exists",
    )
    chunk_size: int = opt(1000, "images per work unit, which is also one output shard")
    label_files: str = opt(
        "",
        "imagefolder: a label file per split, split=path relative to the source "
        "(CSV/TSV: image path or file name, class, extra columns ignored), comma-separated; "
        "default: the one file beside a split's images that names them",
    )
    unlabeled_splits: str = opt(
        "", "imagefolder: splits ingested without labels, comma-separated (e.g. test)"
    )
    layout_check: str = opt(
        "strict",
        "imagefolder: strict refuses a layout that may be misread (a lone folder holding a "
        "split's images, classes in an evaluation split only); warn ingests it as seen",
    )
    classes: str = opt(
        "",
        "imagefolder: keep only these classes: a shipped list (imagenet100: CMC's ImageNet-100; "
        "imagenet1k) or a text file of class names, one a line; a split lacking one is refused",
    )


# Format name -> `opener(spec, options) -> Source`. Openers import their source kind lazily: a
# kind's readers (and their dependencies) load only when that format is used.
SOURCES: Registry[Callable[[str, SourceOptions], Source]] = Registry("source format")


@SOURCES.register("imagefolder")
def _imagefolder(spec: str, o: SourceOptions) -> Source:
    from sepp_ray.data.classlists import load_class_list
    from sepp_ray.data.sources.imagefolder import ImageFolderSource
    from sepp_ray.data.sources.labels import parse_splits_option

    return ImageFolderSource(
        spec,
        chunk_size=o.chunk_size,
        label_files=parse_splits_option(o.label_files, "source_options.label_files"),
        unlabeled_splits=tuple(s.strip() for s in o.unlabeled_splits.split(",") if s.strip()),
        layout_check=o.layout_check,
        classes=load_class_list(o.classes) if o.classes else None,
    )


@SOURCES.register("cifar10")
def _cifar10(spec: str, o: SourceOptions) -> Source:
    from sepp_ray.data.sources.cifar import Cifar10Source

    return Cifar10Source(spec, chunk_size=o.chunk_size)


@SOURCES.register("cifar100")
def _cifar100(spec: str, o: SourceOptions) -> Source:
    from sepp_ray.data.sources.cifar import Cifar100Source

    return Cifar100Source(spec, label_kind=o.cifar100_labels, chunk_size=o.chunk_size)


@SOURCES.register("stl10")
def _stl10(spec: str, o: SourceOptions) -> Source:
    from sepp_ray.data.sources.stl10 import Stl10Source

    splits = tuple(s.strip() for s in o.stl10_splits.split(",") if s.strip())
    return Stl10Source(spec, splits=splits, chunk_size=o.chunk_size)


@SOURCES.register("parquet")
def _parquet(spec: str, o: SourceOptions) -> Source:
    from sepp_ray.data.sources.parquet_table import ParquetTableSource

    return ParquetTableSource(
        spec,
        image_column=o.image_column,
        label_column=o.label_column,
        split_column=o.split_column,
        id_column=o.id_column,
    )


@SOURCES.register("digits")
def _digits(spec: str, o: SourceOptions) -> Source:
    from sepp_ray.data.sources.builtin import DigitsSource

    return DigitsSource(
        size=o.size, test_fraction=o.test_fraction, seed=o.seed, chunk_size=o.chunk_size
    )


@SOURCES.register("synthetic")
def _synthetic(spec: str, o: SourceOptions) -> Source:
    from sepp_ray.data.sources.builtin import SyntheticSource

    return SyntheticSource(
        n=o.n, size=o.size, test_fraction=o.test_fraction, seed=o.seed, chunk_size=o.chunk_size
    )


# What --format accepts: auto (guess from the files, `detect_format`) or a registered kind.
FORMATS = ("auto", *SOURCES)


def detect_format(spec: str) -> str:
    """Guess the format of a path/URI from the files it holds."""
    if spec in BUILTIN:
        return spec
    check_reachable(spec)
    fs, path = filesystem(spec)
    if not fs.exists(path):
        raise SeppError(
            f"source {spec!r} does not exist: give a path or URI, or one of the built-in "
            f"sources {BUILTIN}"
        )
    if fs.isfile(path):
        if path.endswith(".parquet"):
            return "parquet"
        if path.endswith((".tar.gz", ".tgz", ".tar")):
            raise SeppError(
                f"{spec} is an archive: extract it first (tar xzf {posixpath.basename(path)}) "
                "and pass the extracted folder"
            )
        raise SeppError(
            f"cannot tell the format of file {spec}: pass a folder (ImageFolder, CIFAR, STL-10) "
            "or a .parquet file, or set --format"
        )
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    if "data_batch_1" in names or "batches.meta" in names or "cifar-10-batches-py" in names:
        return "cifar10"
    if "cifar-100-python" in names or (
        {"train", "meta"} <= names and fs.isfile(posixpath.join(path, "meta"))
    ):
        return "cifar100"
    if "train_X.bin" in names or "unlabeled_X.bin" in names or "stl10_binary" in names:
        return "stl10"
    if names and all(n.endswith(".parquet") or n.startswith((".", "_")) for n in names):
        return "parquet"
    return "imagefolder"


def open_source(spec: str, fmt: str = "auto", options: SourceOptions | None = None) -> Source:
    """The Source for ``spec`` (a path, URI or built-in name) in format ``fmt``."""
    o = options or SourceOptions()
    if fmt not in FORMATS:
        raise SeppError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if spec in DOWNLOADABLE and "://" not in spec and not os.path.exists(spec):
        from sepp_ray.data.download import download_dataset

        fmt = spec
        spec = download_dataset(spec, os.path.expanduser(o.download_root))
    if fmt == "auto":
        fmt = detect_format(spec)
    elif fmt not in BUILTIN:
        check_reachable(spec)
    return SOURCES.get(fmt)(spec, o)
