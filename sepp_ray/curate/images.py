"""Images of an ingested dataset, fetched by id from its shards, read ahead a page at a time.

The server never holds the dataset: it keeps an index ``id -> (shard, row group, row)`` built
from the ``id`` and ``label`` columns alone (restricted to the ids the pairs name) and each
shard's footer. Parquet reads a column a row group at a time, so an image costs its group's
``image`` column chunk (256 images at ingest), read as one exact range (no read-ahead: s3fs
would fetch 50 MB). Three things keep that cost paid once:
- each group is read by one request at a time: the others asking for it wait for that read;
- when a page of pairs is served, the row groups of its images and of the next page's are read
  at once, in parallel, before the browser asks for them;
- what a group read brings is kept in a cache bounded in bytes (it must hold two pages): the
  images of this page and the next at the hot end, the group's other images of the pairs only
  in spare room (see `ByteLRU`).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from sepp_ray.curate.cache import ByteLRU
from sepp_ray.data.dataset import ImageDataset
from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem, is_remote

# magic bytes -> MIME type of the encodings ingest stores
_MIME = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))
READERS = 8  # row groups read at once (object storage serves parallel range reads well)


def mime_type(data: bytes) -> str:
    for magic, mime in _MIME:
        if data.startswith(magic):
            return mime
    return "application/octet-stream"


@dataclass
class _Read:
    """One row group being read, the ids its readers want now, and those of the next page
    (cached less hot: reading ahead evicts the pages shown before, not this one)."""

    future: Future[dict[int, bytes]]
    wanted: set[int] = field(default_factory=set)
    ahead: set[int] = field(default_factory=set)


class ImageStore:
    """Labels and image bytes of the ids in ``wanted`` (the images the pairs name)."""

    def __init__(self, dataset_uri: str, wanted: np.ndarray, cache_bytes: int = 512 << 20) -> None:
        ds = ImageDataset.open(dataset_uri)
        self.uri = dataset_uri
        self.classes = ds.classes
        self._fs = filesystem(dataset_uri)[0]
        self._paths = ds.file_paths()
        self._meta: list[pq.FileMetaData] = []
        self._index(np.unique(np.asarray(wanted, np.int64)))
        self._cache = ByteLRU(cache_bytes)
        self._reads: dict[tuple[int, int], _Read] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="sepp-curate-images")

    def _index(self, wanted: np.ndarray) -> None:
        """The index of ``wanted``, sorted by id, and its order by (shard, group, row)."""
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("id", "label", "file", "group", "row")}
        for fi, path in enumerate(self._paths):
            with self._open(path) as f:
                pf = pq.ParquetFile(f)
                t = pf.read(columns=["id", "label"])
            self._meta.append(pf.metadata)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            group = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
            row = np.arange(t.num_rows) - np.repeat(np.cumsum([0, *sizes[:-1]]), sizes)
            keep = np.isin(t["id"].to_numpy(), wanted)
            cols["id"].append(t["id"].to_numpy()[keep])
            lab = t["label"].fill_null(-1).to_numpy(zero_copy_only=False)
            cols["label"].append(np.asarray(lab, np.int64)[keep])
            cols["file"].append(np.full(int(keep.sum()), fi, np.int32))
            cols["group"].append(group[keep])
            cols["row"].append(row[keep].astype(np.int32))
        cat = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}
        order = np.argsort(cat["id"], kind="stable")
        self._ids, self._label = cat["id"][order], cat["label"][order]
        self._file, self._group = cat["file"][order], cat["group"][order]
        self._row = cat["row"][order]
        missing = np.setdiff1d(wanted, self._ids)
        if len(missing):
            raise SeppError(
                f"{len(missing)} image ids of the pairs (e.g. {int(missing[0])}) are not in "
                f"{self.uri}: the pairs were mined from another dataset; pass the right one "
                "as dataset=URI"
            )
        # index rows grouped by row group: the members of a group are one slice
        self._by_group = np.lexsort((self._row, self._group, self._file))
        keys = self._file[self._by_group].astype(np.int64) << 32 | self._group[self._by_group]
        starts: list[int] = np.flatnonzero(np.diff(keys, prepend=-1) != 0).tolist()
        ends = [*starts[1:], len(keys)]
        self._members = {
            (int(self._file[self._by_group[s]]), int(self._group[self._by_group[s]])): (s, e)
            for s, e in zip(starts, ends, strict=True)
        }

    def _open(self, path: str) -> Any:
        """A shard, read exactly where Parquet asks: s3fs otherwise reads ahead 50 MB (its
        default block) on every read, most of a shard for one image."""
        if is_remote(self.uri):
            return self._fs.open(path, "rb", cache_type="none")
        return self._fs.open(path, "rb")

    @property
    def has_labels(self) -> bool:
        return bool(len(self._label)) and bool((self._label >= 0).any())

    @property
    def cached_bytes(self) -> int:
        return self._cache.bytes

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Index rows of ``ids``, -1 where an id is unknown."""
        ids = np.asarray(ids, np.int64)
        if not len(self._ids):
            return np.full(len(ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
        return np.where(self._ids[pos] == ids, pos, -1)

    def labels(self, ids: np.ndarray) -> np.ndarray:
        """Labels of known ids (-1: unlabeled)."""
        rows = self._rows(ids)
        return np.where(rows >= 0, self._label[np.maximum(rows, 0)], -1)

    def image(self, image_id: int) -> bytes:
        """Encoded bytes of one image; KeyError for an id the pairs do not name."""
        row = int(self._rows(np.array([image_id]))[0])
        if row < 0:
            raise KeyError(image_id)
        with self._lock:
            hit = self._cache.get(image_id)
            if hit is not None:
                return hit
            read = self._start(row, image_id)
        return read.future.result()[image_id]

    def prefetch(self, ids: np.ndarray, ahead: np.ndarray | None = None) -> int:
        """Start reading the row groups of ``ids`` (wanted now), then of ``ahead`` (wanted
        next), that are not cached; returns how many reads started. Never waits."""
        batches = [(np.asarray(ids, np.int64), False)]
        if ahead is not None:
            batches.append((np.asarray(ahead, np.int64), True))
        with self._lock:
            before = len(self._reads)
            for batch, later in batches:
                rows = self._rows(batch).tolist()
                for image_id, row in zip(batch.tolist(), rows, strict=True):
                    if row >= 0 and image_id not in self._cache:
                        self._start(row, image_id, later)
            return len(self._reads) - before

    def _start(self, row: int, image_id: int, later: bool = False) -> _Read:
        """The read of the group holding index ``row`` (joined when one is running); under
        ``_lock``."""
        key = (int(self._file[row]), int(self._group[row]))
        read = self._reads.get(key)
        if read is None:
            read = _Read(Future())
            self._reads[key] = read
            read.future = self._pool.submit(self._read_group, key, read)
        (read.ahead if later else read.wanted).add(image_id)
        return read

    def _read_group(self, key: tuple[int, int], read: _Read) -> dict[int, bytes]:
        """The pairs' images of one row group, cached (the wanted ones hot) as a side effect."""
        try:
            fi, g = key
            with self._open(self._paths[fi]) as f:
                pf = pq.ParquetFile(f, metadata=self._meta[fi])
                column = pf.read_row_group(g, columns=["image"])["image"]
            s, e = self._members[key]
            members = self._by_group[s:e]
            data = column.take(self._row[members]).to_pylist()
            images = dict(zip(self._ids[members].tolist(), data, strict=True))
            with self._lock:
                wanted, ahead = set(read.wanted), read.ahead - read.wanted
            for i in images:  # the group's other pair images: spare room only
                if i not in wanted and i not in ahead:
                    self._cache.put(i, images[i], hot=False)
            for i in [*ahead, *wanted]:  # the images asked for now end hottest
                self._cache.put(i, images[i])
            return images
        finally:
            with self._lock:
                self._reads.pop(key, None)
