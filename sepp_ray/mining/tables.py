"""Reading the mining stage's tables back: embeddings (`sepp embed`) and pairs (`sepp mine`).

The one reader of each, so every consumer (the search actors, the pair statistics, pretraining,
the curation page, the report) checks the location's kind the same way and reads only the
files its manifest lists, never stray files in the folder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sepp_ray.errors import SeppError
from sepp_ray.mining.anchors import Vectors
from sepp_ray.storage import Location, read_manifest


def _manifest(uri: str, kind: str, what: str) -> dict[str, Any]:
    m = read_manifest(uri)
    if m.get("kind") != kind:
        raise SeppError(f"{uri} is a {m.get('kind')!r} output, not {what}")
    return m


def _label_array(t: pa.Table) -> np.ndarray:
    """The ``label`` column of an embeddings table as int64, -1 where unlabeled."""
    return t["label"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def read_embeddings(
    uri: str,
    columns: list[str],
    *,
    files: list[int] | None = None,
    ids: np.ndarray | None = None,
) -> pa.Table:
    """``columns`` of an embeddings location, rows sorted by id (whatever order the files were
    written in). ``files`` selects shard files by index (sharded-keys mode); ``ids`` keeps only
    those rows, filtered file by file so memory holds only what is kept."""
    m = _manifest(uri, "embeddings", "embeddings")
    loc = Location(uri)
    listed = m["files"] if files is None else [m["files"][i] for i in files]
    read = sorted(set(columns) | {"id"})
    tables = []
    for f in listed:
        with loc.fs.open(loc.join(f["path"]), "rb") as fh:
            t = pq.read_table(fh, columns=read)
        if ids is not None:
            t = t.filter(pc.is_in(t["id"], value_set=pa.array(ids, pa.int64())))
        tables.append(t)
    if not tables:
        types = {
            "id": pa.int64(),
            "label": pa.int64(),
            "split": pa.string(),
            "embedding": pa.list_(pa.float32(), int(m["dim"])),
        }
        return pa.table({c: pa.array([], types[c]) for c in columns})
    return pa.concat_tables(tables).sort_by("id").select(columns)


def load_embeddings(
    uri: str, files: list[int] | None = None, ids: np.ndarray | None = None
) -> tuple[Vectors, np.ndarray]:
    """(a subset of) an embeddings location as Vectors and labels (-1 where unlabeled), sorted
    by id; ``files`` and ``ids`` as in `read_embeddings`."""
    dim = int(read_manifest(uri).get("dim", 0))
    t = read_embeddings(uri, ["id", "label", "embedding"], files=files, ids=ids)
    vecs = t["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vecs = np.asarray(vecs, dtype=np.float32).reshape(-1, dim)
    return Vectors(t["id"].to_numpy().astype(np.int64), vecs), _label_array(t)


def embedding_ids(uri: str) -> np.ndarray:
    """Every image id of an embeddings location, sorted."""
    return read_embeddings(uri, ["id"])["id"].to_numpy().astype(np.int64)


def embedding_labels(uri: str) -> dict[int, int] | None:
    """Label by image id (-1 where unlabeled), or None when no image has a label."""
    t = read_embeddings(uri, ["id", "label"])
    labels = _label_array(t)
    if (labels < 0).all():
        return None
    return dict(zip(t["id"].to_pylist(), labels.tolist(), strict=True))


def read_pairs(uri: str, which: str = "pairs", columns: list[str] | None = None) -> pa.Table:
    """The ``pairs`` (or ``candidates``) table of a `sepp mine` output (all columns when
    ``columns`` is None)."""
    m = _manifest(uri, "pairs", "mined pairs")
    loc = Location(uri)
    with loc.fs.open(loc.join(m["files"][which]), "rb") as f:
        return pq.read_table(f, columns=columns)
