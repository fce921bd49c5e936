"""Ray Data callable class: training items (encoded bytes) -> fixed-size uint8 arrays.

Decoding runs on Ray Data's CPU workers, ahead of the trainers, so the GPU only augments.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from sepp_ray.data.images import decode_rgb


def _decode(blob: bytes, size: int) -> np.ndarray:
    return decode_rgb(blob, size)


class DecodeItems:
    """{item_id, image, image2, pos_ids, ...} -> {id, image, image2 (B x S x S x 3 uint8),
    pos_ids (B x P int64, -1 padded)}. A pure batch function; tests call it without Ray."""

    def __init__(self, size: int, max_positives: int) -> None:
        self.size = size
        self.p = max_positives

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        n = batch.num_rows
        img = np.stack([_decode(b, self.size) for b in batch["image"].to_pylist()])
        same = [
            a is b or a == b
            for a, b in zip(batch["image"].to_pylist(), batch["image2"].to_pylist(), strict=True)
        ]
        img2 = img.copy()
        for i, (blob, s) in enumerate(zip(batch["image2"].to_pylist(), same, strict=True)):
            if not s:
                img2[i] = _decode(blob, self.size)
        pos = np.full((n, self.p), -1, dtype=np.int64)
        for i, lst in enumerate(batch["pos_ids"].to_pylist()):
            lst = (lst or [])[: self.p]
            pos[i, : len(lst)] = lst
        return {
            "id": batch["item_id"].to_numpy().astype(np.int64),
            "image": img,
            "image2": img2,
            "pos_ids": pos,
        }
