"""The stable on-disk schema of image shards."""

from __future__ import annotations

import pyarrow as pa

SHARDS_DIR = "shards"

# id: stable int64 (hash of the source key); image: encoded PNG/JPEG bytes of an 8-bit RGB
# image; label: index into the manifest's "classes", null when unlabeled; split: "train",
# "test", ...; key: the source-relative key the id was derived from (for humans and reports).
IMAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
        pa.field("split", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
    ]
)
