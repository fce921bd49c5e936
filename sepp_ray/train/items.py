"""Training items: what one row of a pretraining epoch is, for every way of using pairs.

Each item yields two views: view 1 from ``image``, view 2 from ``image2``.
- original (kind 0): image2 is the same image (the usual two augmentations of one image);
- semantic pair (kind 1, SePP-CID "dataset mode", arXiv 2306.16122): image = anchor,
  image2 = its mined positive; the training set is the originals plus these items, so every
  method works unchanged;
- curated pair (kind 2): the same, from a user-supplied (image_a, image_b) table, as in the
  semantic-pairs dataset paper (arXiv 2510.08722), with or without the originals;
- augmentation pair (kind 3): the same count of extra items as semantic pairs, but made of one
  image twice: the fair "AP" baseline for SP-versus-AP comparisons.
Multi-positive mode instead gives each original item ``pos_ids``: the ids of its semantic
positives, so contrastive losses count them as positives when they share a batch.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from sepp_ray.config import opt
from sepp_ray.errors import SeppError

log = logging.getLogger(__name__)
MODES = ("none", "dataset", "multi_positive", "both")
ORIGINAL, SEMANTIC, CURATED, AUGMENTATION = 0, 1, 2, 3


@dataclass(frozen=True)
class PairsConfig:
    """How mined or curated pairs enter training."""

    pairs: str | None = opt(None, "pairs location (the output of `sepp mine`); none: plain method")
    mode: str = opt(
        "dataset",
        "dataset: pair items added to the originals (SePP-CID); "
        "multi_positive: positives in the loss; both; none",
    )
    curated: str | None = opt(
        None,
        "a Parquet table of curated pairs: columns image_a, "
        "image_b holding image ids of the dataset",
    )
    curated_only: bool = opt(False, "train on the curated pairs alone, without the originals")
    augmentation_pairs: bool = opt(
        False,
        "AP baseline: replace each semantic pair item by an item of one image twice (same count)",
    )
    max_positives: int = opt(4, "multi_positive: positives kept per image")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise SeppError(f"pairs.mode must be one of {MODES}, got {self.mode!r}")
        if self.curated_only and not self.curated:
            raise SeppError("pairs.curated_only needs pairs.curated (a table of image pairs)")
        if self.max_positives < 1:
            raise SeppError("pairs.max_positives must be >= 1")


def derived_id(*parts: int | str) -> int:
    """A stable positive int64 for an extra item, disjoint in practice from image ids."""
    key = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") & (2**63 - 1)


def check_ids(name: str, wanted: np.ndarray, known: np.ndarray) -> None:
    """Pairs must name images of the dataset: a clear error with the count and examples."""
    missing = np.setdiff1d(np.unique(wanted), known)
    if len(missing):
        raise SeppError(
            f"{name} name {len(missing)} image id(s) absent from the training split "
            f"(e.g. {missing[:5].tolist()}): were they mined on another dataset or split?"
        )


def build_items(
    images: pa.Table, pairs: pa.Table | None, cfg: PairsConfig, curated: pa.Table | None = None
) -> tuple[pa.Table, dict[str, Any]]:
    """images (id, image, ...) + pairs (anchor_id, positive_id) -> items table and counts."""
    cfg.validate()
    ids = images["id"].to_numpy()
    order = np.argsort(ids)
    sorted_ids = ids[order]
    blobs = images["image"]

    def take(wanted: np.ndarray) -> pa.Array:
        return blobs.take(pa.array(order[np.searchsorted(sorted_ids, wanted)]))

    use_pairs = cfg.mode != "none" and pairs is not None
    if cfg.mode != "none" and pairs is None and not curated:
        log.warning("pairs.mode=%s but no pairs were given: training the plain method", cfg.mode)
    a = p = np.empty(0, np.int64)
    if use_pairs and pairs is not None:
        a = pairs["anchor_id"].to_numpy().astype(np.int64)
        p = pairs["positive_id"].to_numpy().astype(np.int64)
        check_ids("the pairs", np.concatenate([a, p]), sorted_ids)
        if len(a) == 0:
            log.warning("the pairs table is empty: training the plain method")
    parts: list[dict[str, Any]] = []
    counts = {"original": 0, "semantic": 0, "curated": 0, "augmentation": 0}
    if not cfg.curated_only:
        pos = _positives(a, p, cfg.max_positives) if cfg.mode in ("multi_positive", "both") else {}
        parts.append(
            {
                "item_id": ids,
                "image": blobs,
                "image2": blobs,
                "kind": np.full(len(ids), ORIGINAL, np.int8),
                "pos_ids": [pos.get(int(i), []) for i in ids],
            }
        )
        counts["original"] = len(ids)
    if use_pairs and cfg.mode in ("dataset", "both") and len(a):
        # AP baseline: the same count of items, each one image twice (no semantic positive)
        tag, kind, name, second = (
            ("ap", AUGMENTATION, "augmentation", a)
            if cfg.augmentation_pairs
            else ("sp", SEMANTIC, "semantic", p)
        )
        item = np.array([derived_id(tag, int(x), int(y)) for x, y in zip(a, p, strict=True)])
        parts.append(
            {
                "item_id": item,
                "image": take(a),
                "image2": take(second),
                "kind": np.full(len(a), kind, np.int8),
                "pos_ids": [[] for _ in a],
            }
        )
        counts[name] = len(a)
    if curated is not None:
        for col in ("image_a", "image_b"):
            if col not in curated.column_names:
                raise SeppError(
                    f"the curated pairs table needs columns image_a, image_b "
                    f"(image ids); it has {curated.column_names}"
                )
        ca = curated["image_a"].to_numpy().astype(np.int64)
        cb = curated["image_b"].to_numpy().astype(np.int64)
        check_ids("the curated pairs", np.concatenate([ca, cb]), sorted_ids)
        item = np.array([derived_id("cp", x, y) for x, y in zip(ca, cb, strict=True)])
        parts.append(
            {
                "item_id": item,
                "image": take(ca),
                "image2": take(cb),
                "kind": np.full(len(ca), CURATED, np.int8),
                "pos_ids": [[] for _ in ca],
            }
        )
        counts["curated"] = len(ca)
    if not parts or sum(counts.values()) == 0:
        raise SeppError("no training items: the dataset split is empty and no pairs were given")
    tables = [
        pa.table(
            {
                "item_id": pa.array(x["item_id"], pa.int64()),
                "image": x["image"],
                "image2": x["image2"],
                "kind": pa.array(x["kind"], pa.int8()),
                "pos_ids": pa.array(x["pos_ids"], pa.list_(pa.int64())),
            }
        )
        for x in parts
    ]
    table = pa.concat_tables([t.cast(tables[0].schema) for t in tables])
    uniq = len(np.unique(table["item_id"].to_numpy()))
    if uniq != table.num_rows:
        raise SeppError(
            f"{table.num_rows - uniq} training items repeat: the pairs table has "
            "duplicate rows; deduplicate it"
        )
    return table, counts


def _positives(a: np.ndarray, p: np.ndarray, cap: int) -> dict[int, list[int]]:
    """Each image's semantic positives, both directions, most frequent first, at most cap."""
    out: dict[int, list[int]] = {}
    for x, y in zip(np.concatenate([a, p]), np.concatenate([p, a]), strict=True):
        lst = out.setdefault(int(x), [])
        if int(y) not in lst and len(lst) < cap:
            lst.append(int(y))
    return out
