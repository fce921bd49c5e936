"""How big the data of a plan is, found without reading it.

A dry run must not touch object storage (the data may not be there yet, and no credentials
may be at hand), so a dataset is sized from what is cheap and local: a complete ingested
dataset's manifest on a local disk, a local source's file listing, or the published split
sizes of a dataset named by its format (cifar10, stl10) or class list (imagenet100,
imagenet1k). ``--data-size`` names one, or gives the training split's image count, where none
of these applies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from sepp_ray.data.sources import BUILTIN, SourceOptions
from sepp_ray.errors import SeppError


@dataclass(frozen=True)
class DataSize:
    """Images per split as training sees them, the image side when uniform, and where the
    figures come from."""

    name: str
    splits: dict[str, int]
    side: int | None
    source: str
    ingested: bool = False  # the sizes are an ingested dataset's (no ingest stage to plan)
    kind: str = "files"  # what ingest reads: encoded files, or arrays it encodes (CIFAR, STL-10)

    def split(self, name: str) -> int:
        if name not in self.splits:
            raise SeppError(
                f"split {name!r} is not in {self.name} (splits: {', '.join(self.splits)}): "
                "set the run's split to one of them"
            )
        return self.splits[name]


KNOWN: dict[str, DataSize] = {
    "cifar10": DataSize(
        "CIFAR-10", {"train": 50_000, "test": 10_000}, 32, "Krizhevsky 2009", kind="arrays"
    ),
    "cifar100": DataSize(
        "CIFAR-100", {"train": 50_000, "test": 10_000}, 32, "Krizhevsky 2009", kind="arrays"
    ),
    "stl10": DataSize(
        "STL-10",
        {"train": 5_000, "test": 8_000, "unlabeled": 100_000},
        96,
        "Coates, Lee & Ng, AISTATS 2011",
        kind="arrays",
    ),
    "imagenet100": DataSize(
        "ImageNet-100",
        {"train": 126_689, "test": 5_000},
        None,
        "CMC's 100 ILSVRC-2012 classes (arXiv 1906.05849): train, and val moved to test/",
        kind="files",
    ),
    "imagenet1k": DataSize(
        "ImageNet-1k",
        {"train": 1_281_167, "test": 50_000},
        None,
        "ILSVRC-2012 (Russakovsky et al., IJCV 2015): train, and val moved to test/",
        kind="files",
    ),
}
KNOWN["imagenet"] = KNOWN["imagenet1k"]
DIGITS = 1_797  # scikit-learn's load_digits


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def from_option(value: str) -> DataSize:
    """``--data-size``: a known dataset's name, or the training split's image count."""
    if value in KNOWN:
        return KNOWN[value]
    if value.replace("_", "").replace(",", "").isdigit():
        n = int(value.replace("_", "").replace(",", ""))
        if n > 0:
            return DataSize(f"{n:,} images", {"train": n}, None, "--data-size", ingested=True)
    raise SeppError(
        f"--data-size {value!r}: give a known dataset ({', '.join(KNOWN)}) or the number of "
        "images in the training split"
    )


def ingested_size(uri: str) -> DataSize | None:
    """A complete ingested dataset on a local disk, sized by its manifest; None otherwise."""
    from sepp_ray.storage import MANIFEST

    path = uri.removeprefix("file://")
    if not _is_local(uri) or not os.path.isfile(os.path.join(path, MANIFEST)):
        return None
    from sepp_ray.storage import read_manifest

    m = read_manifest(uri)
    if m.get("kind") != "images":
        return None
    size = m.get("image_size", {})
    side = int(size["width"][0]) if size.get("uniform") else None
    splits = {s: int(v["total"]) for s, v in m["splits"].items()}
    return DataSize(uri, splits, side, "its manifest", ingested=True)


def _builtin(name: str, o: SourceOptions) -> DataSize:
    n = DIGITS if name == "digits" else o.n
    test = int(round(n * o.test_fraction))
    return DataSize(
        name,
        {"train": n - test, "test": test},
        o.size,
        "the built-in source's options",
        kind="arrays",
    )


def _listed(source: str, fmt: str, o: SourceOptions) -> DataSize | None:
    """A local ImageFolder tree, sized by listing its files (no image is read)."""
    from sepp_ray.data.sources import detect_format, open_source

    if not _is_local(source) or not os.path.isdir(source.removeprefix("file://")):
        return None
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt in KNOWN:
        return None  # the published sizes serve
    if fmt != "imagefolder":
        return None
    src: Any = open_source(source, fmt, o)
    splits = {s: int(lay.images) for s, lay in sorted(src.layout.items())}
    return DataSize(source, splits, None, "a listing of its files")


def source_size(source: str, fmt: str, o: SourceOptions) -> DataSize | None:
    """A pipeline SOURCE's size before ingest, without reading an image; None when unknown."""
    done = ingested_size(source)
    if done is not None:
        return done
    if source in BUILTIN or fmt in BUILTIN:
        return _builtin(source if source in BUILTIN else fmt, o)
    listed = _listed(source, fmt, o)
    if listed is not None:
        return listed
    name = fmt if fmt in KNOWN else source if source in KNOWN else o.classes
    if name == "stl10":
        wanted = [s.strip() for s in o.stl10_splits.split(",") if s.strip()]
        k = KNOWN["stl10"]
        return replace(k, splits={s: k.splits[s] for s in wanted if s in k.splits})
    if name in KNOWN:
        return KNOWN[name]
    return None


def carve_val(size: DataSize, val_fraction: float) -> DataSize:
    """The sizes after ingest carves ``val_fraction`` of train into 'val' (sepp_ray.data.ingest)."""
    if size.ingested or val_fraction <= 0 or "train" not in size.splits or "val" in size.splits:
        return size
    train = size.splits["train"]
    val = int(round(train * val_fraction))
    return replace(size, splits={**size.splits, "train": train - val, "val": val})


def need_size(uri: str) -> SeppError:
    """The error of a plan that cannot size its data."""
    return SeppError(
        f"the plan needs the size of {uri}, which is not local or not a known dataset (a dry "
        f"run reads no remote data): give --data-size NAME ({', '.join(KNOWN)}) or "
        "--data-size N (images in the training split)"
    )
