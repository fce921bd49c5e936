"""The one frozen-backbone forward loop and the evaluation-time decode (pure torch, no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torch import nn

from sepp_ray.data.decode import decode_batch, decode_blobs
from sepp_ray.data.images import decode_rgb
from sepp_ray.errors import SeppError
from sepp_ray.models.encode import encode


def _net() -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm: train and eval mode give different outputs, so the mode encode uses shows
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def test_encode_normalises_in_eval_mode_batched_and_restores_the_mode() -> None:
    net = _net().train()
    net[1].running_mean.fill_(0.3)  # a non-trivial eval-mode BatchNorm
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    out = encode(net, images, mean, std, torch.device("cpu"), batch_size=3)
    assert net.training  # the caller's mode comes back
    net.eval()
    with torch.no_grad():
        want = net((images.float() / 255.0 - mean) / std)
    assert out.dtype == torch.float32 and out.shape == (10, 4)
    torch.testing.assert_close(out, want)
    whole = encode(net, images, mean, std, torch.device("cpu"), channels_last=True)
    torch.testing.assert_close(whole, want)
    empty = encode(net, images[:0], mean, std, torch.device("cpu"))
    assert empty.shape == (0, 4)


def test_encode_takes_only_uint8() -> None:
    with pytest.raises(SeppError, match="uint8"):
        encode(_net(), torch.rand(2, 3, 8, 8), torch.zeros(1), torch.ones(1), torch.device("cpu"))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_decode_resizes_to_a_square_without_cropping() -> None:
    rng = np.random.default_rng(0)
    blobs = [_png(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)) for _ in range(3)]
    x = decode_blobs(blobs, 8)
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 8, 8)
    assert np.array_equal(x[1].permute(1, 2, 0).numpy(), decode_rgb(blobs[1], 8))
    table = pa.table({"image": pa.array(blobs, pa.binary())})
    assert torch.equal(decode_batch(table, 8), x)
