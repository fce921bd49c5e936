"""Training items: what one row of a pretraining epoch is, for every way of using pairs.

Each item yields two views: view 1 from ``image``, view 2 from ``image2``.
- original (kind 0): an image of the split, read straight from the dataset's shards; view 2 is
  another augmentation of the same image;
- semantic pair (kind 1, SePP-CID "dataset mode", arXiv 2306.16122): image = anchor,
  image2 = its mined positive; the training set is the originals plus these items, so every
  method works unchanged;
- curated pair (kind 2): the same, from a user-supplied (image_a, image_b) table, as in the
  semantic-pairs dataset paper (arXiv 2510.08722), with or without the originals;
- augmentation pair (kind 3): the same count of extra items as semantic pairs, but made of one
  image twice: the fair "AP" control for SP-versus-AP comparisons.
Multi-positive and cancellation modes give each image ``pos_ids``, its semantic positives; an
anchor and its positives form a *group* stored together, so they share a batch (without that
an anchor meets its positives in about batch/N of steps, and the mode does almost nothing).

Items are an index, not copies: the driver plans them from ids (`plan_items`), and
`sepp_ray.train.item_table` fetches the images they name from the shards into the run's own
Parquet table. Originals are never copied.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from sepp_ray.config import opt
from sepp_ray.errors import SeppError

log = logging.getLogger(__name__)
MODES = ("none", "dataset", "multi_positive", "both", "cancel")
GROUP_MODES = ("multi_positive", "both", "cancel")  # pairs used in the loss: grouped images
ORIGINAL, SEMANTIC, CURATED, AUGMENTATION, GROUPED = 0, 1, 2, 3, 4
REMINE_ENCODERS = ("auto", "momentum", "online")


@dataclass(frozen=True)
class PairsConfig:
    """How mined or curated pairs enter training."""

    pairs: str | None = opt(None, "pairs location (the output of `sepp mine`); none: plain method")
    mode: str = opt(
        "dataset",
        "dataset: pair items added to the originals (SePP-CID); multi_positive: positives in "
        "the loss; both; cancel: positives removed from the negatives (false-negative "
        "cancellation); none",
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
    max_positives: int = opt(4, "multi_positive / cancel: positives kept per image")
    remine_every: int | None = opt(
        None,
        "re-mine the pairs every this many epochs with the encoder in training (its training "
        "split embedded by the training workers, mined with the first pairs' mining config); "
        "the steps, learning rate and optimizer go on unchanged; none: mine once",
    )
    remine_encoder: str = opt(
        "auto",
        "the encoder a re-mining round embeds with: auto (the momentum or teacher encoder "
        "where the method has one, else the online backbone), momentum, online",
    )

    def validate(self) -> None:
        if self.mode not in MODES:
            raise SeppError(f"pairs.mode must be one of {MODES}, got {self.mode!r}")
        if self.curated_only and not self.curated:
            raise SeppError("pairs.curated_only needs pairs.curated (a table of image pairs)")
        if self.max_positives < 1:
            raise SeppError("pairs.max_positives must be >= 1")
        if self.augmentation_pairs and self.mode != "dataset":
            raise SeppError(
                "pairs.augmentation_pairs is the control of dataset mode: set pairs.mode=dataset"
            )
        if self.augmentation_pairs and not self.pairs:
            raise SeppError("pairs.augmentation_pairs needs pairs.pairs (it matches their count)")
        self._validate_remining()

    def _validate_remining(self) -> None:
        """Re-mining replaces mined semantic pairs: where there are none, it cannot apply."""
        if self.remine_encoder not in REMINE_ENCODERS:
            raise SeppError(
                f"pairs.remine_encoder must be one of {REMINE_ENCODERS}, "
                f"got {self.remine_encoder!r}"
            )
        if self.remine_every is None:
            return
        if isinstance(self.remine_every, bool) or self.remine_every < 1:
            raise SeppError(
                f"pairs.remine_every must be >= 1 epochs or none, got {self.remine_every}"
            )
        why = None
        if not self.pairs:
            why = "it needs pairs.pairs, the first round's pairs (the sampler's)"
        elif self.mode == "none":
            why = "pairs.mode=none trains without the pairs"
        elif self.augmentation_pairs:
            why = "augmentation pairs (the AP control) use no mined pair"
        elif self.curated_only:
            why = "pairs.curated_only trains on the curated pairs alone"
        if why:
            raise SeppError(f"pairs.remine_every cannot apply: {why}")


def read_curated(uri: str) -> pa.Table:
    """A curated pairs table's id columns (image_a, image_b)."""
    import pyarrow.parquet as pq

    from sepp_ray.storage import Location

    loc = Location(uri)
    with loc.fs.open(loc.path, "rb") as f:
        return pq.read_table(f, columns=["image_a", "image_b"])


def derived_id(*parts: int | str) -> int:
    """A stable positive int64 for an extra item, disjoint in practice from image ids."""
    key = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") & (2**63 - 1)


@dataclass
class ItemPlan:
    """The pair-item table to build, as ids only (what the driver holds)."""

    item_id: np.ndarray  # int64, one per row
    a: np.ndarray  # int64 image id of `image`
    b: np.ndarray  # int64 image id of `image2`, -1 = the same image
    kind: np.ndarray  # int8
    unit: np.ndarray  # int64: rows of one unit are written together, in row order
    group: np.ndarray  # int64: -1 or the group id
    pos: list[list[int]]  # semantic positives of `a` (grouped rows), else []
    exclude: np.ndarray  # sorted image ids that train in groups, not as originals
    counts: dict[str, int] = field(default_factory=dict)
    originals: bool = True

    @property
    def rows(self) -> int:
        return len(self.item_id)


def _positives(a: np.ndarray, p: np.ndarray, cap: int) -> dict[int, list[int]]:
    """Each image's semantic positives, both directions, in pair order, at most ``cap``."""
    out: dict[int, list[int]] = {}
    for x, y in zip(np.concatenate([a, p]).tolist(), np.concatenate([p, a]).tolist(), strict=True):
        lst = out.setdefault(x, [])
        if y not in lst and len(lst) < cap:
            lst.append(y)
    return out


def groups(a: np.ndarray, p: np.ndarray, cap: int, seed: int) -> list[list[int]]:
    """Disjoint groups [anchor, positive, ...]: anchors in a seeded order, each taking up to
    ``cap`` of its positives not yet in a group. Every image is in at most one group."""
    pos = _positives(a, p, cap)
    anchors = np.unique(a)
    placed: set[int] = set()
    out: list[list[int]] = []
    for x in np.random.default_rng([seed, 0x6A]).permutation(anchors).tolist():
        if x in placed:
            continue
        members = [y for y in pos.get(x, []) if y not in placed][:cap]
        if not members:
            continue
        out.append([x, *members])
        placed.update(out[-1])
    return out


def plan_items(
    pairs: pa.Table | None, curated: pa.Table | None, cfg: PairsConfig, seed: int = 0
) -> ItemPlan:
    """The item table's rows from pair ids; see the module docstring for each kind."""
    cfg.validate()
    rows: dict[str, list[Any]] = {k: [] for k in ("item_id", "a", "b", "kind", "unit", "group")}
    pos: list[list[int]] = []
    counts = {"original": 0, "semantic": 0, "curated": 0, "augmentation": 0, "grouped": 0}

    def add(item: int, a: int, b: int, kind: int, unit: int, group: int, p: list[int]) -> None:
        for k, v in zip(rows, (item, a, b, kind, unit, group), strict=True):
            rows[k].append(v)
        pos.append(p)

    a = p = np.empty(0, np.int64)
    if cfg.mode != "none" and pairs is not None:
        a = pairs["anchor_id"].to_numpy().astype(np.int64)
        p = pairs["positive_id"].to_numpy().astype(np.int64)
        if len(a) == 0:
            log.warning("the pairs table is empty: training the plain method")
    elif cfg.mode != "none" and not curated:
        log.warning("pairs.mode=%s but no pairs were given: training the plain method", cfg.mode)
    exclude = np.empty(0, np.int64)
    if cfg.mode in ("dataset", "both") and len(a):
        ap = cfg.augmentation_pairs
        tag, kind, name = (
            ("ap", AUGMENTATION, "augmentation") if ap else ("sp", SEMANTIC, "semantic")
        )
        for x, y in zip(a.tolist(), p.tolist(), strict=True):
            item = derived_id(tag, x, y)
            add(item, x, -1 if ap else y, kind, item, -1, [])
        counts[name] = len(a)
    if cfg.mode in GROUP_MODES and len(a):
        pos_map = _positives(a, p, cfg.max_positives)
        for members in groups(a, p, cfg.max_positives, seed):
            g = derived_id("g", members[0])
            for m in members:
                add(m, m, -1, GROUPED, g, g, pos_map.get(m, []))
        exclude = np.unique(
            np.asarray(
                [r for r, k in zip(rows["a"], rows["kind"], strict=True) if k == GROUPED], np.int64
            )
        )
        counts["grouped"] = len(exclude)
    if curated is not None:
        for col in ("image_a", "image_b"):
            if col not in curated.column_names:
                raise SeppError(
                    f"the curated pairs table needs columns image_a, image_b "
                    f"(image ids); it has {curated.column_names}"
                )
        ca = curated["image_a"].to_numpy().astype(np.int64)
        cb = curated["image_b"].to_numpy().astype(np.int64)
        for x, y in zip(ca.tolist(), cb.tolist(), strict=True):
            item = derived_id("cp", x, y)
            add(item, x, y, CURATED, item, -1, [])
        counts["curated"] = len(ca)
    plan = ItemPlan(
        item_id=np.asarray(rows["item_id"], np.int64),
        a=np.asarray(rows["a"], np.int64),
        b=np.asarray(rows["b"], np.int64),
        kind=np.asarray(rows["kind"], np.int8),
        unit=np.asarray(rows["unit"], np.int64),
        group=np.asarray(rows["group"], np.int64),
        pos=pos,
        exclude=exclude,
        counts=counts,
        originals=not cfg.curated_only,
    )
    uniq = len(np.unique(plan.item_id))
    if uniq != plan.rows:
        raise SeppError(
            f"{plan.rows - uniq} training items repeat: the pairs table has "
            "duplicate rows; deduplicate it"
        )
    return plan
