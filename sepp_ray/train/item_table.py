"""The run's pair-item table: the images an `ItemPlan` names, fetched from the shards and written
once per run under ``OUT/items``. Small tables are assembled in one Ray task; large ones by a Ray
Data hash shuffle of only the images that pairs use, in partitions of ~256 MB (an Arrow binary
array stops at 2 GiB). Both run outside a sweep trial's placement group.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sepp_ray.errors import SeppError
from sepp_ray.train.items import ItemPlan

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
