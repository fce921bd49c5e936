"""`sepp ingest` and `sepp inspect`: the data stage's commands (configs and entry points)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sepp_ray import config as cfg
from sepp_ray.config import opt
from sepp_ray.console import say
from sepp_ray.data.ingest import ImageOptions
from sepp_ray.data.sources import FORMATS, SourceOptions
from sepp_ray.errors import SeppError


@dataclass
class IngestConfig:
    source: str = opt(
        "",
        "a path or URI (ImageFolder, CIFAR, STL-10, Parquet) or a built-in "
        "source: digits, synthetic",
    )
    out: str = opt("", "output URI: a local path, file:// or s3://bucket/prefix")
    format: str = opt("auto", f"source format: {', '.join(FORMATS)}")
    overwrite: bool = opt(False, "replace a complete output already at `out`")
    images: ImageOptions = field(
        default_factory=ImageOptions, metadata={"help": "image validation and storage"}
    )
    source_options: SourceOptions = field(
        default_factory=SourceOptions, metadata={"help": "options of each source kind"}
    )


@dataclass
class InspectConfig:
    uri: str = opt("", "a dataset URI (the output of `sepp ingest`)")
    grid: str | None = opt(
        None, "where to write the PNG grid of samples (default: <uri>/inspect/samples.png)"
    )
    per_class: int = opt(8, "images per class row in the grid")
    json: bool = opt(False, "print the whole manifest as JSON instead of a summary")


def run_ingest(c: IngestConfig) -> int:
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import open_source

    if not c.source or not c.out:
        raise SeppError("ingest needs SOURCE and OUT (see `sepp ingest --help`)")
    source = open_source(c.source, c.format, c.source_options)
    manifest = ingest(source, c.out, c.images, overwrite=c.overwrite, config=cfg.to_dict(c))
    splits = ", ".join(f"{k} {v['total']}" for k, v in manifest["splits"].items())
    say(
        f"ingested {manifest['num_images']} images ({splits}; "
        f"{manifest['skipped']['count']} skipped) into {c.out}"
    )
    return 0


def run_inspect(c: InspectConfig) -> int:
    from sepp_ray.data.dataset import ImageDataset
    from sepp_ray.data.inspect import sample_grid, save_png, summary_text

    if not c.uri:
        raise SeppError("inspect needs a dataset URI (see `sepp inspect --help`)")
    ds = ImageDataset.open(c.uri)
    say(json.dumps(ds.manifest, indent=2) if c.json else summary_text(c.uri, ds.manifest))
    # inside the dataset's own location: inspecting from another folder leaves nothing there
    grid = c.grid or f"{c.uri.rstrip('/')}/inspect/samples.png"
    save_png(sample_grid(ds, per_class=c.per_class), grid)
    say(f"sample grid: {grid}")
    return 0
