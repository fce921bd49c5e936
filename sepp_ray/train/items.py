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

Items are an index, not copies: the driver plans them from ids (`plan_items`), and a Ray Data
step (`write_item_table`) fetches the images they name from the shards, by a hash shuffle of
only the images that pairs use, into the run's own Parquet table. Originals are never copied.
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sepp_ray.config import opt
from sepp_ray.errors import SeppError

log = logging.getLogger(__name__)
MODES = ("none", "dataset", "multi_positive", "both", "cancel")
GROUP_MODES = ("multi_positive", "both", "cancel")  # pairs used in the loss: grouped images
ORIGINAL, SEMANTIC, CURATED, AUGMENTATION, GROUPED = 0, 1, 2, 3, 4
ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("image2", pa.binary(), nullable=True),  # null: the same image as `image`
        pa.field("label", pa.int32(), nullable=True),  # the label of `image`
        pa.field("kind", pa.int8(), nullable=False),
        pa.field("group", pa.int64(), nullable=False),  # -1, or the group of a grouped image
        pa.field("pos_ids", pa.list_(pa.int64()), nullable=False),
    ]
)
ROW_GROUP = 256


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


class _Explode:
    """Image shard rows -> one row per (plan row, role) that needs the image."""

    def __init__(self, plan: ItemPlan, split: str) -> None:
        ids = np.concatenate([plan.a, plan.b[plan.b >= 0]])
        row = np.concatenate([np.arange(plan.rows), np.flatnonzero(plan.b >= 0)])
        role = np.concatenate(
            [np.zeros(plan.rows, np.int8), np.ones(int((plan.b >= 0).sum()), np.int8)]
        )
        order = np.argsort(ids, kind="stable")
        self.ids, self.row, self.role = ids[order], row[order], role[order]
        self.unit = plan.unit
        self.split = split

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        batch = batch.filter(pc.equal(batch["split"], self.split))
        ids = batch["id"].to_numpy()
        lo = np.searchsorted(self.ids, ids, "left")
        hi = np.searchsorted(self.ids, ids, "right")
        n = hi - lo
        src = np.repeat(np.arange(len(ids)), n)
        req = (
            np.concatenate([np.arange(a, b) for a, b in zip(lo, hi, strict=True)])
            if n.sum()
            else np.zeros(0, np.int64)
        )
        rows = self.row[req]
        return pa.table(
            {
                "unit": pa.array(self.unit[rows], pa.int64()),
                "row": pa.array(rows, pa.int64()),
                "role": pa.array(self.role[req], pa.int8()),
                "image": batch["image"].take(pa.array(src, pa.int64())),
                "label": batch["label"].take(pa.array(src, pa.int64())),
            }
        )


class _Assemble:
    """All requests of one unit -> its item rows, in plan order; incomplete rows flagged."""

    def __init__(self, plan: ItemPlan) -> None:
        self.plan = plan
        self.__name__ = "assemble_items"  # Ray Data names a map by its function

    def __call__(self, t: pa.Table) -> pa.Table:
        pl = self.plan
        rows = t["row"].to_numpy()
        roles = t["role"].to_numpy()
        images = t["image"].to_pylist()
        labels = t["label"].to_pylist()
        got: dict[tuple[int, int], int] = {}
        for k, (r, o) in enumerate(zip(rows.tolist(), roles.tolist(), strict=True)):
            got.setdefault((r, o), k)
        out: dict[str, list[Any]] = {k: [] for k in (*ITEM_SCHEMA.names, "missing")}
        for r in sorted({int(x) for x in rows.tolist()}):
            i = got.get((r, 0))
            j = got.get((r, 1)) if pl.b[r] >= 0 else None
            missing = i is None or (pl.b[r] >= 0 and j is None)
            out["missing"].append(int(pl.a[r]) if i is None else (int(pl.b[r]) if missing else -1))
            out["item_id"].append(int(pl.item_id[r]))
            out["image"].append(images[i] if i is not None else b"")
            out["image2"].append(images[j] if j is not None else None)
            out["label"].append(labels[i] if i is not None else None)
            out["kind"].append(int(pl.kind[r]))
            out["group"].append(int(pl.group[r]))
            out["pos_ids"].append(pl.pos[r])
        schema = ITEM_SCHEMA.append(pa.field("missing", pa.int64()))
        return pa.table(out, schema=schema)


class _Write:
    """One block of assembled rows -> one Parquet file of the run's item table."""

    def __init__(self, out_uri: str, seed: int, row_group: int) -> None:
        self.out_uri = out_uri
        self.seed = seed
        self.row_group = row_group

    def __call__(self, t: pa.Table) -> dict[str, Any]:
        from sepp_ray.storage import filesystem

        missing = t["missing"].to_numpy()
        bad = missing[missing >= 0]
        t = t.filter(pa.array(missing < 0)).drop_columns(["missing"])
        uri = ""
        if t.num_rows:
            # units in a seeded order inside the file, rows of one unit kept together
            units = t["item_id"].to_numpy().copy()
            g = t["group"].to_numpy()
            units[g >= 0] = g[g >= 0]
            _, first = np.unique(units, return_index=True)
            key = np.random.default_rng([self.seed, int(units[0]) & 0xFFFF]).permutation(len(first))
            rank = dict(zip(units[np.sort(first)].tolist(), key.tolist(), strict=True))
            order = np.argsort([rank[u] for u in units.tolist()], kind="stable")
            t = t.take(pa.array(order))
            fs, base = filesystem(self.out_uri)
            fs.makedirs(base, exist_ok=True)
            name = f"part-{uuid.uuid4().hex[:12]}.parquet"
            with fs.open(f"{base}/{name}", "wb") as f:
                pq.write_table(t.cast(ITEM_SCHEMA), f, row_group_size=self.row_group)
            uri = f"{self.out_uri.rstrip('/')}/{name}"
        return {
            "file": [uri],
            "rows": [t.num_rows],
            "missing": [len(bad)],
            "examples": [bad[:5].tolist()],
        }


def image_bytes(files: list[str], fs: Any, sample: int = 4) -> float:
    """Mean stored bytes of an image, from the Parquet footers of a few shards (no data read)."""
    size = rows = 0
    for path in files[:sample]:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        col = meta.schema.to_arrow_schema().get_field_index("image")
        for g in range(meta.num_row_groups):
            size += meta.row_group(g).column(col).total_uncompressed_size
            rows += meta.row_group(g).num_rows
    return size / max(rows, 1)


ONE_TASK_BYTES = 2**28  # item tables needing less image data are assembled in one task


def _in_one_task(
    plan: ItemPlan, image_files: list[str], fs: Any, split: str, out_uri: str, seed: int, rg: int
) -> list[dict[str, Any]]:
    """A small item table without a shuffle: one task reads the shards' requested images
    (bounded by ONE_TASK_BYTES), assembles every unit and writes one file."""
    explode = _Explode(plan, split)
    parts = []
    for path in image_files:
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=["id", "image", "label", "split"])
        parts.append(explode(t))
    found = pa.concat_tables(parts)
    out = _Write(out_uri, seed, rg)(_Assemble(plan)(found))
    return [{k: v[0] for k, v in out.items()}]


def _shuffled(
    plan: ItemPlan, image_files: list[str], fs: Any, split: str, out_uri: str, seed: int, rg: int
) -> list[dict[str, Any]]:
    """A large item table: a Ray Data job (read shards -> keep requested images -> hash shuffle
    by unit in partitions of ~256 MB of image bytes -> assemble -> write)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(image_files, filesystem=fs).select_columns(
        ["id", "image", "label", "split"]
    )
    need = plan.rows + int((plan.b >= 0).sum())
    parts = int(max(1, min(512, math.ceil(need * image_bytes(image_files, fs) / 2**28))))
    ds = ds.map_batches(_Explode(plan, split), batch_format="pyarrow")
    ds = ds.groupby("unit", num_partitions=parts).map_groups(
        _Assemble(plan), batch_format="pyarrow"
    )
    ds = ds.map_batches(_Write(out_uri, seed, rg), batch_format="pyarrow", batch_size=None)
    return ds.take_all()


def write_item_table(
    plan: ItemPlan,
    image_files: list[str],
    fs: Any,
    split: str,
    out_uri: str,
    seed: int = 0,
    one_task_bytes: int = ONE_TASK_BYTES,
) -> list[str]:
    """Fetch the images the plan names and write the run's item table under ``out_uri``;
    returns its files. Up to ``one_task_bytes`` of needed images, one task assembles it; beyond,
    a Ray Data hash shuffle does (`_shuffled`). Raises SeppError when pairs name images absent
    from ``split``."""
    import ray

    if plan.rows == 0:
        return []
    from sepp_ray.train.census import outside_placement_group

    # row groups are the unit ranks take: small enough that even a small table spreads
    # over the epoch and the ranks (at least ~64 of them), at most ROW_GROUP rows
    row_group = int(np.clip(plan.rows // 64, 16, ROW_GROUP))
    need = plan.rows + int((plan.b >= 0).sum())
    need_bytes = need * image_bytes(image_files, fs)
    # run outside any placement group (a sweep trial's is sized for its own actor)
    where = {"scheduling_strategy": outside_placement_group()}
    if need_bytes <= one_task_bytes:
        task = ray.remote(num_cpus=0.5)(_in_one_task).options(**where)
        results = ray.get(task.remote(plan, image_files, fs, split, out_uri, seed, row_group))
    else:
        task = ray.remote(num_cpus=0)(_shuffled).options(**where)
        results = ray.get(task.remote(plan, image_files, fs, split, out_uri, seed, row_group))
    files = sorted(r["file"] for r in results if r["file"])
    missing = sum(int(r["missing"]) for r in results)
    written = sum(int(r["rows"]) for r in results)
    if missing or written != plan.rows:
        examples = [x for r in results for x in r["examples"]][:5]
        absent = plan.rows - written
        raise SeppError(
            f"the pairs name image id(s) absent from split {split!r} of the dataset "
            f"({absent} item(s); e.g. image ids {examples}): were they mined on another "
            "dataset or split?"
        )
    return files
