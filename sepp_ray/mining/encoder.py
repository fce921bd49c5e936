"""The semantic sampler's encoder: a frozen network that embeds raw (un-augmented) images.

It is a timm model by name (random init seeded, or timm's pretrained weights), a checkpoint of
this project by URI, or a bare state dict plus a timm name. Images are only resized and
normalised as the encoder expects; the model runs in eval mode, bf16 autocast on GPU, fp32 on
CPU; embeddings come out L2-normalised in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from sepp_ray.config import opt
from sepp_ray.data.decode import decode_batch
from sepp_ray.errors import SeppError
from sepp_ray.models.backbones import create_backbone
from sepp_ray.models.checkpoint import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneMeta,
    load_backbone,
    load_into,
    load_state_file,
)
from sepp_ray.models.encode import encode
from sepp_ray.storage import filesystem


@dataclass(frozen=True)
class EncoderConfig:
    """Which encoder embeds the images."""

    name: str = opt(
        "resnet18",
        "timm model name (ignored when checkpoint is a sepp-ray "
        "checkpoint location, which names its own architecture)",
    )
    checkpoint: str | None = opt(
        None,
        "a sepp-ray checkpoint location, or a state dict file "
        "(.pt/.pth/.safetensors) for the timm model `name`",
    )
    pretrained: bool = opt(
        False,
        "load timm's pretrained weights for `name` (needs them "
        "downloadable or in the local Hugging Face cache)",
    )
    cifar_stem: bool = opt(False, "3x3 stride-1 first conv, no max-pool (32 px data)")
    image_size: int | None = opt(
        None,
        "input side in pixels (default: the checkpoint's or "
        "the model's own; the dataset's with cifar_stem)",
    )
    seed: int = opt(0, "seed of a randomly initialised encoder (no checkpoint, no pretrained)")
    batch_size: int = opt(256, "images per forward pass")


def load_encoder(cfg: EncoderConfig) -> tuple[nn.Module, BackboneMeta, str]:
    """(model in eval mode on CPU, meta, identity string)."""
    if cfg.checkpoint:
        fs, path = filesystem(cfg.checkpoint)
        if fs.isdir(path):
            model, meta, digest = load_backbone(cfg.checkpoint)
            if cfg.image_size:
                meta = BackboneMeta(
                    meta.name, meta.cifar_stem, meta.feat_dim, cfg.image_size, meta.mean, meta.std
                )
            return model, meta, f"sepp-checkpoint:{meta.name}:sha256={digest}"
        state, digest = load_state_file(cfg.checkpoint)
        model, dim = create_backbone(cfg.name, cifar_stem=cfg.cifar_stem)
        load_into(model, state, cfg.name, cfg.checkpoint)
        identity = f"state-dict:{cfg.name}:cifar_stem={cfg.cifar_stem}:sha256={digest}"
    else:
        torch.manual_seed(cfg.seed)
        try:
            model, dim = create_backbone(
                cfg.name, cifar_stem=cfg.cifar_stem, pretrained=cfg.pretrained
            )
        except SeppError:
            raise
        except Exception as e:  # hub errors when weights cannot be fetched
            raise SeppError(
                f"cannot build encoder {cfg.name!r} (pretrained={cfg.pretrained}): "
                f"{type(e).__name__}: {e}"
            ) from e
        identity = (
            f"timm-pretrained:{cfg.name}"
            if cfg.pretrained
            else f"random-init:{cfg.name}:cifar_stem={cfg.cifar_stem}:seed={cfg.seed}"
        )
    pcfg: dict[str, Any] = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(pcfg.get("mean", IMAGENET_MEAN))
    std = tuple(pcfg.get("std", IMAGENET_STD))
    size = cfg.image_size or (
        32 if cfg.cifar_stem else int(pcfg.get("input_size", (3, 224, 224))[-1])
    )
    meta = BackboneMeta(cfg.name, cfg.cifar_stem, dim, size, mean, std)  # type: ignore[arg-type]
    return model.eval(), meta, identity


def unit_features(
    model: nn.Module,
    images: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    what: str,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 B x 3 x H x W -> L2-normalised fp32 B x D on ``device``, what mining searches (the
    sampler's embedding and a re-mining round's); NaN/inf features of ``what`` are refused."""
    feats = encode(model, images, norm[0], norm[1], device, channels_last=channels_last)
    feats = F.normalize(feats.float(), dim=1)  # normalise in fp32, never in bf16
    if not torch.isfinite(feats).all():
        raise SeppError(
            f"{what} produced NaN/inf features: the weights are broken or diverged; use "
            "another checkpoint"
        )
    return feats


class Embedder:
    """Ray Data callable class: {id, image, ...} batches -> {id, label, split, embedding}.

    ``__init__`` loads the encoder once per actor; ``__call__`` is a pure batch function.
    """

    def __init__(self, encoder: EncoderConfig, device: str | None = None) -> None:
        self.model, self.meta, self.identity = load_encoder(encoder)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.mean = torch.tensor(self.meta.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.meta.std, device=self.device).view(1, 3, 1, 1)

    def embed_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x 3 x H x W (any device) -> L2-normalised fp32 B x D on CPU."""
        channels_last = self.device.type == "cuda"
        norm = (self.mean, self.std)
        what = f"encoder {self.identity}"
        return unit_features(self.model, images, norm, self.device, what, channels_last).cpu()

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = decode_batch(batch, self.meta.image_size)
        feats = self.embed_uint8(images).numpy()
        dim = feats.shape[1]
        emb = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), dim)
        cols: dict[str, Any] = {"id": batch.column("id")}
        for name in ("label", "split"):
            if name in batch.column_names:
                cols[name] = batch.column(name)
        cols["embedding"] = emb
        return pa.table(cols)
