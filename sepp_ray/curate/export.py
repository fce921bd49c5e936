"""The curated pairs table: the accepted pairs as `sepp pretrain pairs.curated=OUT` reads them.

One Parquet file (columns image_a, image_b, similarity) whose key-value metadata carries the
manifest (counts, who exported it and who decided, when, the pairs and dataset it came from,
the precision of the accepted pairs when the data has labels). A single file written
atomically is complete the moment it exists, and `pairs.curated` takes a file.
"""

from __future__ import annotations

import getpass
import io
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sepp_ray.curate.pairs import ACCEPTED, PairTable
from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem, write_atomic

MANIFEST_KEY = b"sepp"
KIND = "curated_pairs"


def read_curated_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a curated pairs table; SeppError when ``uri`` is not one."""
    fs, path = filesystem(uri)
    if not fs.isfile(path):
        raise SeppError(f"{uri} is not a file: give the curated pairs table `sepp curate` wrote")
    with fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    try:
        m = json.loads(meta[MANIFEST_KEY])
    except (KeyError, ValueError):
        m = None
    if not isinstance(m, dict) or m.get("kind") != KIND:
        raise SeppError(f"{uri} is not a curated pairs table written by `sepp curate`")
    return m


def export_curated(
    table: PairTable,
    codes: np.ndarray,
    out: str,
    source: dict[str, Any],
    deciders: set[str] | None = None,
    who: str | None = None,
) -> dict[str, Any]:
    """Write the accepted pairs to ``out`` (replacing an earlier export, never another file);
    returns the manifest."""
    fs, path = filesystem(out)
    if fs.isdir(path):
        raise SeppError(f"{out} is a folder: give a file path for the export, e.g. {out}/x.parquet")
    if fs.exists(path):
        read_curated_manifest(out)  # refuses to replace a file that is not an earlier export
    rows = np.flatnonzero(codes == ACCEPTED)
    if not len(rows):
        raise SeppError("no pair is accepted yet: accept pairs before exporting")
    progress = table.progress(codes)
    manifest: dict[str, Any] = {
        "kind": KIND,
        "format_version": 1,
        "created_unix": time.time(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "exported_by": who or getpass.getuser(),
        "decided_by": sorted(deciders or ()),
        **source,
        "counts": {
            "pairs": progress["total"],
            "accepted": progress["accepted"],
            "rejected": progress["rejected"],
            "undecided": progress["undecided"],
            "exported": int(len(rows)),
        },
        "precision": progress["precision"],
    }
    if progress["precision"] is not None:
        mined = table.agree[table.labeled].mean() if table.labeled.any() else None
        manifest["precision_mined"] = None if mined is None else round(float(mined), 4)
    t = pa.table(
        {
            "image_a": pa.array(table.anchor[rows], pa.int64()),
            "image_b": pa.array(table.positive[rows], pa.int64()),
            "similarity": pa.array(table.similarity[rows], pa.float32()),
        }
    ).replace_schema_metadata({MANIFEST_KEY: json.dumps(manifest).encode()})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    write_atomic(fs, path, buf.getvalue())
    return manifest
