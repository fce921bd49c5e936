"""Images of an ingested dataset, fetched one id at a time from its shards.

The server never holds the dataset: it keeps an index ``id -> (shard, row group)`` built from
the ``id`` and ``label`` columns alone (restricted to the ids the pairs name), and reads one
row group (256 images at ingest) when an image is asked for, with a small LRU of row groups.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import pyarrow.parquet as pq

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem

# magic bytes -> MIME type of the encodings ingest stores
_MIME = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


def mime_type(data: bytes) -> str:
    for magic, mime in _MIME:
        if data.startswith(magic):
            return mime
    return "application/octet-stream"


class ImageStore:
    """Labels and image bytes of the ids in ``wanted`` (the images the pairs name)."""

    def __init__(self, dataset_uri: str, wanted: np.ndarray, cache_groups: int = 8) -> None:
        ds = ImageDataset.open(dataset_uri)
        self.uri = dataset_uri
        self.classes = ds.classes
        self._fs = filesystem(dataset_uri)[0]
        self._paths = ds.file_paths()
        wanted = np.unique(np.asarray(wanted, np.int64))
        ids, files, groups, labels = [], [], [], []
        for fi, path in enumerate(self._paths):
            with self._fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                for g in range(pf.num_row_groups):
                    t = pf.read_row_group(g, columns=["id", "label"])
                    gid = t["id"].to_numpy()
                    keep = np.isin(gid, wanted)
                    if not keep.any():
                        continue
                    lab = t["label"].fill_null(-1).to_numpy(zero_copy_only=False)
                    ids.append(gid[keep])
                    labels.append(np.asarray(lab, np.int64)[keep])
                    files.append(np.full(int(keep.sum()), fi, np.int32))
                    groups.append(np.full(int(keep.sum()), g, np.int32))
        cat = np.concatenate
        all_ids = cat(ids) if ids else np.zeros(0, np.int64)
        order = np.argsort(all_ids, kind="stable")
        self._ids = all_ids[order]
        self._file = cat(files)[order] if ids else np.zeros(0, np.int32)
        self._group = cat(groups)[order] if ids else np.zeros(0, np.int32)
        self._label = cat(labels)[order] if ids else np.zeros(0, np.int64)
        missing = np.setdiff1d(wanted, self._ids)
        if len(missing):
            raise SeppError(
                f"{len(missing)} image ids of the pairs (e.g. {int(missing[0])}) are not in "
                f"{dataset_uri}: the pairs were mined from another dataset; pass the right one "
                "as dataset=URI"
            )
        self._cache: OrderedDict[tuple[int, int], dict[int, bytes]] = OrderedDict()
        self._cache_groups = cache_groups
        self._lock = threading.Lock()

    @property
    def has_labels(self) -> bool:
        return bool(len(self._label)) and bool((self._label >= 0).any())

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

    def knows(self, image_id: int) -> bool:
        return bool(self._rows(np.array([image_id]))[0] >= 0)

    def image(self, image_id: int) -> bytes:
        """Encoded bytes of one image; KeyError for an id the pairs do not name."""
        row = int(self._rows(np.array([image_id]))[0])
        if row < 0:
            raise KeyError(image_id)
        group = self._group_images(int(self._file[row]), int(self._group[row]))
        return group[image_id]

    def _group_images(self, fi: int, g: int) -> dict[int, bytes]:
        key = (fi, g)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        with self._fs.open(self._paths[fi], "rb") as f:
            t = pq.ParquetFile(f).read_row_group(g, columns=["id", "image"])
        images = dict(zip(t["id"].to_pylist(), t["image"].to_pylist(), strict=True))
        with self._lock:
            self._cache[key] = images
            while len(self._cache) > self._cache_groups:
                self._cache.popitem(last=False)
        return images
