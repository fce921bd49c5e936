"""Frozen-backbone features of uint8 images: the one forward loop of the pretraining kNN monitor,
evaluation's feature extraction (and its fine-tuned classifiers' scoring) and the semantic
sampler's embedding.

All of them must turn the same pixels into features the same way (a monitor that normalised
differently from the final evaluation would report another number), so they share this loop:
uint8 -> float in [0, 1] -> (x - mean) / std, eval mode, no autograd, bf16 autocast on CUDA and
fp32 elsewhere, features returned in fp32. Pure torch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sepp_ray.errors import SeppError


@torch.inference_mode()
def encode(
    model: nn.Module,
    images: Tensor,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    *,
    batch_size: int | None = None,
    channels_last: bool = False,
) -> Tensor:
    """uint8 images N x 3 x H x W (any device) -> fp32 N x D on ``device``.

    ``mean``/``std``: 1 x 3 x 1 x 1 on ``device``. ``batch_size``: images per forward pass (all
    at once when None). ``channels_last``: the input in that memory format, for a model
    converted to it. The model's train/eval mode is restored afterwards.
    """
    if images.dtype != torch.uint8:
        raise SeppError(f"encode takes uint8 images, got {images.dtype}: pass the decoded pixels")
    was_training = model.training
    model.eval()
    n = images.shape[0]
    step = batch_size or max(1, n)
    out: list[Tensor] = []
    try:
        # an empty input still runs once, so the result has the model's feature width
        for start in range(0, n, step) if n else [0]:
            x = images[start : start + step].to(device, non_blocking=True).float().div_(255.0)
            x = (x - mean) / std  # x: B x 3 x H x W
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out.append(model(x).float())  # features in fp32, never left in bf16
    finally:
        model.train(was_training)
    return torch.cat(out)
