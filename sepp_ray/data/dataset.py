"""Reading ingested image shards back: only complete datasets, only the files they list; and
the one identity of a dataset's content."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sepp_ray.errors import SeppError
from sepp_ray.storage import Location, filesystem, read_manifest


def dataset_fingerprint(manifest: dict[str, Any]) -> str:
    """Identity of an ingested dataset's content: a hash of its manifest less the write time and
    the command line. It covers the source's own fingerprint and everything ingest did to it
    (options, splits, shard files), so two ingests of one source at different settings differ;
    caches of work done on a dataset (features, embeddings, pipeline stages) key on it."""
    body = {k: v for k, v in manifest.items() if k not in ("created_unix", "config")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class ImageDataset:
    """A complete ingested dataset: its manifest and the shard files it lists."""

    uri: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, uri: str) -> ImageDataset:
        manifest = read_manifest(uri)
        if manifest.get("kind") != "images":
            raise SeppError(
                f"{uri} holds a {manifest.get('kind')!r} output, not an image dataset: "
                "point at the output of `sepp ingest`"
            )
        return cls(uri, manifest)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes", []))

    @property
    def fingerprint(self) -> str:
        """`dataset_fingerprint` of this dataset."""
        return dataset_fingerprint(self.manifest)

    @property
    def num_images(self) -> int:
        return int(self.manifest["num_images"])

    def file_paths(self) -> list[str]:
        """Full paths (on this dataset's filesystem) of the shards, in order."""
        loc = Location(self.uri)
        return [loc.join(f["path"]) for f in self.manifest["files"]]

    def read_table(
        self, columns: list[str] | None = None, split: str | None = None, limit: int | None = None
    ) -> pa.Table:
        """Shards as one Arrow table (small data, previews and tests; use ``to_ray`` at scale)."""
        fs, _ = filesystem(self.uri)
        tables: list[pa.Table] = []
        n = 0
        read_cols = (
            None if columns is None else sorted(set(columns) | ({"split"} if split else set()))
        )
        for path in self.file_paths():
            with fs.open(path, "rb") as f:
                t = pq.read_table(f, columns=read_cols)
            if split is not None:
                t = t.filter(pc.equal(t["split"], split))
            if columns is not None:
                t = t.select(columns)
            tables.append(t)
            n += t.num_rows
            if limit is not None and n >= limit:
                break
        if not tables:
            raise SeppError(f"{self.uri} lists no shard files")
        table = pa.concat_tables(tables)
        return table.slice(0, limit) if limit is not None else table

    def to_ray(self, columns: list[str] | None = None) -> Any:
        """A Ray Dataset over the listed shards (never over stray files in the folder)."""
        import ray

        from sepp_ray.ray_utils import init_ray

        init_ray()
        fs, _ = filesystem(self.uri)
        ds = ray.data.read_parquet(self.file_paths(), filesystem=fs)
        return ds.select_columns(columns) if columns else ds
