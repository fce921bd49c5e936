"""Evaluation-time decoding: stored images -> uint8 B x 3 x S x S tensors.

The semantic sampler's embedding, evaluation's feature extraction and semi-supervised
fine-tuning read images this way (`sepp_ray.data.images.decode_rgb`: shorter side to S, then
the central square), and training's kNN monitor decodes in its read tasks with the same
`center_view` (`sepp_ray.train.decode`, mode "eval"): the sampler, the monitor and the
evaluation see the same pixels.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from sepp_ray.data.images import batch_pixels


def decode_batch(batch: pa.Table, size: int) -> torch.Tensor:
    """A batch's images as uint8 B x 3 x size x size: decoded by the CPU stage ahead of the
    actors (`DecodeImages`), or here when the batch still holds encoded bytes."""
    return torch.from_numpy(np.ascontiguousarray(batch_pixels(batch, size))).permute(0, 3, 1, 2)


def decode_blobs(blobs: list[bytes], size: int) -> torch.Tensor:
    """Encoded RGB images -> uint8 B x 3 x size x size (bicubic, antialiased when shrinking)."""
    return decode_batch(pa.table({"image": pa.array(blobs, pa.binary())}), size)
