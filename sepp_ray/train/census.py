"""Counting the training rows of every row group, in parallel Ray tasks.

The plan needs, per row group, how many of its rows train (the split, minus images excluded
because they travel in the pair-item table). Each task reads only the small ``split`` and ``id``
columns of a few files; the driver gets row counts, never image bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sepp_ray.storage import filesystem
from sepp_ray.train.plan import Chunk


def row_filter(table: pa.Table, split: str | None, exclude: np.ndarray | None) -> np.ndarray:
    """Boolean mask of a row group's rows that train: in ``split`` (when the table has one)
    and not in the sorted id array ``exclude``."""
    keep = np.ones(table.num_rows, bool)
    if split is not None and "split" in table.column_names:
        keep &= pc.equal(table["split"], split).to_numpy(zero_copy_only=False)
    if exclude is not None and len(exclude) and "id" in table.column_names:
        keep &= ~np.isin(table["id"].to_numpy(), exclude, assume_unique=False)
    return keep


def count_file(uri: str, table: str, split: str | None, exclude: np.ndarray | None) -> list[Chunk]:
    """Chunks of one Parquet file (one per row group) with their training row counts."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        cols = [c for c in ("split", "id") if c in names]
        out = []
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if (split is None or "split" not in names) and (exclude is None or not len(exclude)):
                out.append(Chunk(uri, g, n, table))
                continue
            t = pf.read_row_group(g, columns=cols)
            out.append(Chunk(uri, g, int(row_filter(t, split, exclude).sum()), table))
    return out


def outside_placement_group() -> Any:
    """A scheduling strategy that escapes the caller's placement group: a sweep trial runs in
    one sized for its own actor, and the data plane's tasks must not have to fit in it."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=None)  # type: ignore[arg-type]


def census(
    uris: list[str], table: str, split: str | None, exclude: Any = None, cpus: float = 0.25
) -> list[Chunk]:
    """Chunks of all ``uris`` in file order, counted in Ray tasks (``exclude``: a sorted id
    array or an ObjectRef of one). Row groups with no training row are dropped."""
    import ray

    if not uris:
        return []

    @ray.remote(num_cpus=cpus)
    def count_many(batch: list[str], excl: np.ndarray | None) -> list[Chunk]:
        return [c for u in batch for c in count_file(u, table, split, excl)]

    per_task = max(1, len(uris) // 64)
    batches = [uris[i : i + per_task] for i in range(0, len(uris), per_task)]
    excl_ref = (
        exclude if exclude is None or isinstance(exclude, ray.ObjectRef) else ray.put(exclude)
    )
    task = count_many.options(scheduling_strategy=outside_placement_group())
    results = ray.get([task.remote(b, excl_ref) for b in batches])
    return [c for r in results for c in r if c.rows > 0]
