"""Items over more than 2 GiB of image bytes: no Arrow offset overflow, and the driver's memory
does not grow with the data (slow: it writes about 4 GB)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.data.schema import IMAGE_SCHEMA
from sepp_ray.train.dataplane import item_table, training_chunks
from sepp_ray.train.items import PairsConfig, plan_items
from sepp_ray.train.plan import total_rows

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
N, BLOB = 720, 2 * 2**20  # 1.4 GiB of images; the pair items hold twice that


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) / 1024 for x in f if x.startswith("VmRSS"))


def test_items_over_2_gib_of_image_bytes(tmp_path: Path) -> None:
    root = tmp_path / "big"
    (root / "shards").mkdir(parents=True)
    files = []
    rng = np.random.default_rng(0)
    for f in range(N // 60):
        ids = list(range(f * 60 + 1, f * 60 + 61))
        blobs = [rng.bytes(BLOB) for _ in ids]  # the item table copies bytes, never decodes
        t = pa.table(
            {
                "id": ids,
                "image": blobs,
                "label": [i % 10 for i in ids],
                "split": ["train"] * 60,
                "key": [str(i) for i in ids],
            },
            schema=IMAGE_SCHEMA,
        )
        pq.write_table(t, root / "shards" / f"part-{f:05d}.parquet", row_group_size=16)
        files.append({"path": f"shards/part-{f:05d}.parquet", "rows": 60})
    (root / "manifest.json").write_text(
        json.dumps(
            {
                "kind": "images",
                "num_images": N,
                "classes": [],
                "files": files,
                "splits": {"train": {"total": N, "labeled": N, "per_class": {}}},
                "image_size": {"width": [4, 4], "height": [4, 4], "uniform": True},
            }
        )
    )
    ids = np.arange(1, N + 1)
    pairs = pa.table({"anchor_id": ids, "positive_id": np.roll(ids, 1)})
    ds = ImageDataset.open(str(root))
    before = _rss_mb()
    plan = plan_items(pairs, None, PairsConfig(pairs="x", mode="dataset"))
    out = item_table(plan, ds, "train", str(tmp_path / "run"), seed=0)
    chunks = training_chunks(ds, plan, out, "train", None)
    grew = _rss_mb() - before
    assert total_rows(chunks) == 2 * N
    written = sum(pq.ParquetFile(f).metadata.num_rows for f in out)
    item_bytes = sum(
        pq.ParquetFile(f).metadata.row_group(g).total_byte_size
        for f in out
        for g in range(pq.ParquetFile(f).metadata.num_row_groups)
    )
    assert written == N and item_bytes > 2 * 2**30
    one = pq.ParquetFile(out[0]).read_row_group(0).to_pylist()[0]
    assert len(one["image"]) == len(one["image2"]) == BLOB
    # the driver held ids and row counts only: far below one shard's worth of bytes
    assert grew < 150, grew
