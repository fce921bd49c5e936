"""Ingest: a source -> Parquet image shards + manifest, as a Ray Data pipeline.

The driver lists the source's work units; Ray Data runs ``IngestShard`` over them in parallel
(read -> decode -> validate -> optional resize -> encode -> write one shard per unit) and each
call returns a one-row summary. The driver merges the summaries, checks ids are unique and writes
the manifest last. Shard names follow the unit index, so a re-run writes the same files.
"""

from __future__ import annotations

import json
import logging
import pickle
import posixpath
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sepp_ray.config import opt
from sepp_ray.data.images import process
from sepp_ray.data.schema import IMAGE_SCHEMA, SHARDS_DIR
from sepp_ray.data.sources.base import Source, image_id
from sepp_ray.errors import SeppError
from sepp_ray.storage import Location, absolute, begin_write, filesystem, finish_write

log = logging.getLogger(__name__)
ENCODINGS = ("keep", "png", "jpeg")


@dataclass(frozen=True)
class ImageOptions:
    """How images are validated and stored."""

    resize: int | None = opt(None, "resize so the shorter side has this many pixels (bicubic)")
    center_crop: bool = opt(False, "after resize, center-crop a resize x resize square")
    encoding: str = opt(
        "keep",
        "keep: store original JPEG/PNG bytes when untouched, else PNG; "
        "png or jpeg: always re-encode",
    )
    jpeg_quality: int = opt(
        95, "JPEG quality when a JPEG is re-encoded (encoding=jpeg, or keep + resize/convert)"
    )
    min_size: int = opt(1, "skip images whose shorter side is below this")
    val_fraction: float = opt(
        0.05,
        "share of the train split carved (seeded, by image id) into a 'val' split for model "
        "selection; 0: none. A source with its own 'val' split needs 0",
    )
    seed: int = opt(0, "seed of the shard order, the row order in shards and the val carve")

    def validate(self) -> None:
        if self.encoding not in ENCODINGS:
            raise SeppError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.resize is not None and self.resize < 1:
            raise SeppError(f"resize must be a positive size in pixels, got {self.resize}")
        if not 1 <= self.jpeg_quality <= 100:
            raise SeppError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise SeppError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def carve_val(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True where a train image goes to the 'val' split: a seeded hash of its id, so the carve
    does not depend on shard layout or worker count, and the same seed carves the same images."""
    if fraction <= 0:
        return np.zeros(len(ids), bool)
    mixed = (np.asarray(ids, np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)) * np.uint64(
        0xBF58476D1CE4E5B9
    )
    return (mixed >> np.uint64(11)).astype(np.float64) / float(2**53) < fraction


class IngestShard:
    """Ray Data callable class: one batch of pickled work units -> shards + a summary per unit.

    ``__call__`` is a pure batch function: tests call it without Ray.
    """

    def __init__(self, source: Source, out_uri: str, options: ImageOptions) -> None:
        self.source = source
        self.out_uri = out_uri
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = zip(batch["index"], batch["unit"], strict=True)
        rows = [self.run_unit(int(i), pickle.loads(u)) for i, u in pairs]
        return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}

    def run_unit(self, index: int, unit: dict[str, Any]) -> dict[str, Any]:
        ids: list[int] = []
        images: list[bytes] = []
        labels: list[int | None] = []
        splits: list[str] = []
        keys: list[str] = []
        skipped: list[tuple[str, str]] = []
        converted: Counter[str] = Counter()
        sizes: set[tuple[int, int]] = set()
        opts = {k: v for k, v in asdict(self.options).items() if k not in ("val_fraction", "seed")}
        own_val = 0
        for item in self.source.read_unit(unit):
            if item.skip is not None:
                skipped.append((item.origin, item.skip))
                continue
            out = process(item.payload, **opts)
            if out.data is None:
                skipped.append((item.origin, out.skip_reason or "unknown"))
                continue
            if out.converted_from:
                converted[out.converted_from] += 1
            sizes.add((out.width, out.height))
            own_val += item.split == "val"
            ids.append(image_id(item.key))
            images.append(out.data)
            labels.append(item.label)
            splits.append(item.split)
            keys.append(item.key)
        if ids:
            # a seeded row order inside the shard, and the val carve (by id: layout-free)
            id_arr = np.asarray(ids, np.int64)
            carve = carve_val(id_arr, self.options.val_fraction, self.options.seed)
            splits = [
                "val" if c and s == "train" else s for c, s in zip(carve, splits, strict=True)
            ]
            perm = np.random.default_rng([self.options.seed, index]).permutation(len(ids))
            ids, images, labels, splits, keys = (
                [col[i] for i in perm] for col in (ids, images, labels, splits, keys)
            )
        rel = ""
        if ids:
            rel = posixpath.join(SHARDS_DIR, f"part-{index:05d}.parquet")
            table = pa.table(
                {"id": ids, "image": images, "label": labels, "split": splits, "key": keys},
                schema=IMAGE_SCHEMA,
            )
            fs, base = filesystem(self.out_uri)
            fs.makedirs(posixpath.join(base, SHARDS_DIR), exist_ok=True)
            with fs.open(posixpath.join(base, rel), "wb") as f:
                pq.write_table(table, f, row_group_size=256)
        return {
            "index": index,
            "file": rel,
            "rows": len(ids),
            # bytes/JSON, not arrays: Ray Data would try to make ragged tensor columns of them
            "ids": np.asarray(ids, dtype=np.int64).tobytes(),
            "labels": np.asarray([-1 if x is None else x for x in labels], np.int64).tobytes(),
            "splits": json.dumps(splits),
            "skipped": json.dumps(skipped),
            "converted": json.dumps(dict(converted)),
            "sizes": json.dumps(sorted(sizes)),
            "own_val": own_val,
        }


def summarise(
    source: Source, summaries: list[dict[str, Any]], options: ImageOptions
) -> dict[str, Any]:
    """Merge per-unit summaries into the manifest body; raise if the result is unusable."""
    summaries = sorted(summaries, key=lambda s: int(s["index"]))
    classes = source.class_names()
    ids = np.concatenate([np.frombuffer(s["ids"], dtype=np.int64) for s in summaries])
    labels = np.concatenate([np.frombuffer(s["labels"], dtype=np.int64) for s in summaries])
    splits = np.array([x for s in summaries for x in json.loads(s["splits"])], dtype=object)
    skipped = [tuple(x) for s in summaries for x in json.loads(s["skipped"])]
    converted: Counter[str] = Counter()
    sizes: set[tuple[int, int]] = set()
    for s in summaries:
        converted.update(json.loads(s["converted"]))
        sizes.update(tuple(x) for x in json.loads(s["sizes"]))
    if len(ids) == 0:
        reasons = Counter(r.split(":")[0] for _, r in skipped)
        raise SeppError(
            f"no valid image in {source.describe().get('uri', source.kind)}: "
            f"{len(skipped)} items skipped ({dict(reasons) or 'the source is empty'}). "
            "Check the path and format."
        )
    own_val = sum(int(s.get("own_val", 0)) for s in summaries)
    if own_val and options.val_fraction > 0:
        raise SeppError(
            f"the source has its own 'val' split ({own_val} images) and images.val_fraction="
            f"{options.val_fraction} would carve another from train: ingest again with "
            "images.val_fraction=0 to use the source's val split for model selection"
        )
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        raise SeppError(
            f"{int((counts > 1).sum())} image ids collide: the source yields duplicate keys. "
            "This is a bug in the source reader; please report it."
        )
    per_split: dict[str, Any] = {}
    for split in sorted(set(splits.tolist())):
        sel = labels[splits == split]
        per_class = {classes[c]: int((sel == c).sum()) for c in range(len(classes))}
        per_split[split] = {
            "total": int(len(sel)),
            "labeled": int((sel >= 0).sum()),
            "per_class": {k: v for k, v in per_class.items() if v},
        }
    mixing = _class_mixing(summaries, len(classes))
    ws = [w for w, _ in sizes]
    hs = [h for _, h in sizes]
    reason_counts = Counter(r.split(":")[0] for _, r in skipped)
    return {
        "kind": "images",
        "num_images": int(len(ids)),
        "classes": classes,
        "splits": per_split,
        "image_size": {
            "width": [min(ws), max(ws)],
            "height": [min(hs), max(hs)],
            "uniform": len(sizes) == 1,
        },
        "converted": dict(converted),
        "order": {"seed": options.seed, "shuffled": True, **mixing},
        "skipped": {
            "count": len(skipped),
            "by_reason": dict(reason_counts),
            "examples": [{"path": p, "reason": r} for p, r in skipped[:20]],
            "file": "skipped.json" if skipped else None,
        },
        "files": [{"path": s["file"], "rows": int(s["rows"])} for s in summaries if s["rows"]],
        "options": asdict(options),
        "schema": {f.name: str(f.type) for f in IMAGE_SCHEMA},
        "skipped_list": skipped,  # popped by the writer into skipped.json
    }


def _class_mixing(summaries: list[dict[str, Any]], n_classes: int) -> dict[str, Any]:
    """Mean number of distinct classes per shard: training mixes shards, but a dataset whose
    shards each hold one class mixes only as well as its chunks are interleaved."""
    per = [
        len(set(np.frombuffer(s["labels"], dtype=np.int64).tolist()) - {-1})
        for s in summaries
        if s["rows"]
    ]
    mean = float(np.mean(per)) if per else 0.0
    return {"classes_per_shard": round(mean, 2), "class_sorted": n_classes > 1 and mean <= 1.0}


def _shuffled_units(source: Source, seed: int) -> list[Any]:
    """The source's units in a seeded order; a source that can mix its items across units
    (``shuffle(seed)``, e.g. an ImageFolder's file list) does so first, so shards mix classes."""
    shuffle = getattr(source, "shuffle", None)
    if callable(shuffle):
        shuffle(seed)
    units = source.units()
    order = np.random.default_rng(seed).permutation(len(units))
    return [units[i] for i in order]


def ingest(
    source: Source,
    out_uri: str,
    options: ImageOptions | None = None,
    *,
    overwrite: bool = False,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the ingest pipeline on the current Ray cluster; return the manifest written."""
    import ray

    from sepp_ray.ray_utils import init_ray
    from sepp_ray.shared_storage import check_shared_storage

    options = options or ImageOptions()
    options.validate()
    names = getattr(source, "split_names", None)
    if callable(names) and "val" in names() and options.val_fraction > 0:
        raise SeppError(
            f"{source.describe().get('uri', source.kind)} has its own 'val' split: ingest with "
            "images.val_fraction=0 to use it for model selection (or rename the folder)"
        )
    units = _shuffled_units(source, options.seed)
    if not units:
        raise SeppError(f"source {source.describe()} has nothing to read")
    fingerprint = source.fingerprint()
    out_uri = absolute(out_uri)
    init_ray()
    # the shards are written by actors on any node: refused before anything is written
    check_shared_storage({"out": out_uri})
    loc = begin_write(out_uri, overwrite=overwrite)
    try:
        items = [{"index": i, "unit": pickle.dumps(u)} for i, u in enumerate(units)]
        n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        blocks = min(len(items), 4 * n_cpus)
        ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            IngestShard,
            fn_constructor_args=(source, out_uri, options),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(n_cpus, len(items))),
            num_cpus=1,
        )
        summaries = list(ds.iter_rows())
        manifest = summarise(source, summaries, options)
    except BaseException:
        _discard(loc)
        raise
    skipped = manifest.pop("skipped_list")
    if manifest["order"]["class_sorted"]:
        log.warning(
            "every shard of %s holds a single class: the source groups its items by class and "
            "cannot reorder them; training mixes shards at row-group level only",
            out_uri,
        )
    for path, reason in skipped[:50]:
        log.warning("skipped %s: %s", path, reason)
    if len(skipped) > 50:
        log.warning(
            "... and %d more skipped; all are listed in %s/skipped.json", len(skipped) - 50, out_uri
        )
    if skipped:
        loc.write_bytes(
            "skipped.json",
            json.dumps([{"path": p, "reason": r} for p, r in skipped], indent=1).encode(),
        )
    manifest["source"] = {**source.describe(), "fingerprint": fingerprint}
    manifest["config"] = config or {}
    finish_write(loc, manifest)
    return manifest


def _discard(loc: Location) -> None:
    """After a failed ingest, remove what this run wrote (the location was claimed by us)."""
    try:
        if loc.exists():
            loc.fs.rm(loc.path, recursive=True)
    except Exception as e:  # cleanup must never mask the original error
        log.warning("could not clean up %s: %s", loc.uri, e)
