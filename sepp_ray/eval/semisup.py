"""Semi-supervised evaluation: fine-tune the whole backbone plus a linear head on 1% / 10% labels.

The protocol of SimCLR (arXiv 2002.05709, sec. 4.2 and appendix B.5) and BYOL (arXiv
2006.07733): a seeded, class-balanced subset of the training labels; fine-tuning with Nesterov
SGD at lr 0.05 x batch/256, no weight decay, only random crops and flips, for 60 epochs at 1% of
the labels and 30 at 10%; top-1 on the test split. Every epoch sees every labeled image: a
subset smaller than the batch is one batch, a larger one is split into ceil(n / batch) batches
of near-equal size (no tiny ragged batch for BatchNorm). It shows how much a representation
helps when labels are scarce, which is the setting SePP targets. This module is plain PyTorch;
the eval command runs it as a Ray task (one GPU where there is one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepp_ray.config import opt
from sepp_ray.data.augment import hflip, normalize, resized_crop, sample_crop_boxes, to_float
from sepp_ray.data.dataset import ImageDataset
from sepp_ray.data.decode import decode_blobs
from sepp_ray.errors import SeppError
from sepp_ray.eval.features import check_split
from sepp_ray.models.checkpoint import BackboneMeta, load_backbone
from sepp_ray.models.encode import encode
from sepp_ray.models.knn import topk_accuracy

# decode the labeled subset once when it fits in this many bytes of uint8 pixels
_CACHE_BYTES = 4 << 30


def protocol_epochs(fraction: float) -> int:
    """SimCLR's fine-tuning epochs (arXiv 2002.05709, appendix B.5): 60 with 1% of the labels,
    30 with 10%. Fractions up to 1% take 60; larger ones take 30."""
    return 60 if fraction <= 0.01 else 30


@dataclass(frozen=True)
class FinetuneConfig:
    """How the backbone and its linear head are fine-tuned."""

    epochs: int | None = opt(
        None, "passes over the labeled subset; null: SimCLR's 60 at <= 1% labels, else 30"
    )
    batch_size: int = opt(256, "images per step")
    lr: float = opt(0.05, "SGD learning rate at batch 256 (scaled linearly with batch_size)")
    weight_decay: float = opt(0.0, "weight decay (SimCLR fine-tunes without)")
    crop_scale: float = opt(0.2, "smallest area share of the random resized crop")
    eval_batch_size: int = opt(512, "images per test batch")

    def validate(self) -> None:
        epochs = 1 if self.epochs is None else self.epochs
        small = min(epochs, self.batch_size, self.eval_batch_size)
        if small < 1:
            raise SeppError("fine-tuning epochs, batch_size and eval_batch_size must be >= 1")
        if self.lr <= 0:
            raise SeppError(f"fine-tuning lr must be > 0, got {self.lr}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise SeppError(f"crop_scale must be in (0, 1], got {self.crop_scale}")


def balanced_subset(
    labels: np.ndarray, fraction: float, seed: int, class_names: list[str] | None = None
) -> np.ndarray:
    """Indices (sorted) of a seeded, class-balanced ``fraction`` of the labeled rows.

    Each class present keeps round(fraction x its count) images, at least one: a fraction so
    small that a class would keep none is an error naming the class. Rows < 0 are unlabeled.
    """
    if not 0.0 < fraction <= 1.0:
        raise SeppError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    classes = np.unique(labels[labels >= 0])
    if len(classes) == 0:
        raise SeppError("no labeled image to draw a label subset from")
    for c in classes:
        rows = np.flatnonzero(labels == c)
        take = math.floor(fraction * len(rows) + 0.5)
        if take == 0:
            name = class_names[c] if class_names and c < len(class_names) else str(c)
            raise SeppError(
                f"label fraction {fraction} leaves class {name!r} empty (it has {len(rows)} "
                f"labeled images): use a fraction >= {0.5 / len(rows):.4g} or a larger dataset"
            )
        chosen.append(rng.permutation(rows)[:take])
    return np.sort(np.concatenate(chosen))


class Classifier(nn.Module):
    """Backbone (pooled features) + linear head."""

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))  # logits: B x C


def _image_source(blobs: list[bytes], size: int) -> Callable[[np.ndarray], Tensor]:
    """idx -> uint8 B x 3 x size x size; the subset is decoded once when it fits in memory."""
    if len(blobs) * 3 * size * size <= _CACHE_BYTES:
        bank = decode_blobs(blobs, size)
        return lambda idx: bank[torch.as_tensor(idx)]
    return lambda idx: decode_blobs([blobs[i] for i in idx], size)


def augment(images: Tensor, meta: BackboneMeta, crop_scale: float, g: torch.Generator) -> Tensor:
    """Random resized crop + horizontal flip + normalise, on the batch's device."""
    x = to_float(images)  # B x 3 x S x S in [0, 1]
    b, _, h, w = x.shape
    boxes = sample_crop_boxes(b, h, w, (crop_scale, 1.0), (3 / 4, 4 / 3), g)
    x = resized_crop(x, boxes, meta.image_size)
    flip = torch.rand(b, generator=g, device=g.device) < 0.5
    return normalize(hflip(x, flip), meta.mean, meta.std)


def epoch_batches(n: int, batch_size: int, g: torch.Generator) -> list[np.ndarray]:
    """One epoch: a seeded order of all ``n`` images in ceil(n / b) near-equal batches, b =
    min(batch_size, n), each sorted. Every image once; no batch below half of b."""
    b = min(batch_size, n)
    order = torch.randperm(n, generator=g).numpy()
    return [np.sort(part) for part in np.array_split(order, math.ceil(n / b))]


def finetune_steps(n: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a fine-tuning run: epochs x ceil(n / min(batch_size, n))."""
    return epochs * math.ceil(n / min(batch_size, n))


def finetune(
    model: Classifier,
    meta: BackboneMeta,
    blobs: list[bytes],
    labels: np.ndarray,
    cfg: FinetuneConfig,
    device: torch.device,
    seed: int = 0,
) -> Classifier:
    """Train all of ``model`` on the encoded images ``blobs`` (SGD Nesterov, cosine schedule),
    ``cfg.epochs`` passes that each see every image (see `epoch_batches`)."""
    if cfg.epochs is None:
        raise SeppError(
            "finetune needs cfg.epochs; run_semisup fills it in per label fraction "
            "(protocol_epochs)"
        )
    images = _image_source(blobs, meta.image_size)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    n = len(blobs)
    bs = min(cfg.batch_size, n)
    total = finetune_steps(n, cfg.batch_size, cfg.epochs)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr * bs / 256,
        momentum=0.9,
        nesterov=True,
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
    )
    g_cpu = torch.Generator().manual_seed(seed)
    g_dev = torch.Generator(device=device).manual_seed(seed)
    model.to(device).train()
    for _ in range(cfg.epochs):
        for idx in epoch_batches(n, bs, g_cpu):
            x = augment(images(idx).to(device), meta, cfg.crop_scale, g_dev)
            y = y_all[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x).float(), y)
            if not torch.isfinite(loss):
                raise SeppError("fine-tuning diverged (loss is NaN/inf): lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def evaluate(
    model: nn.Module,
    meta: BackboneMeta,
    batches: Iterator[tuple[list[bytes], np.ndarray]],
    device: torch.device,
) -> dict[str, float]:
    """Top-1/top-5 over (encoded images, labels) batches, resized and normalised only (the
    forward pass of every frozen-feature protocol, here through the fine-tuned head)."""
    model.eval()
    mean = torch.tensor(meta.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(meta.std, device=device).view(1, 3, 1, 1)
    scores, ys = [], []
    for blobs, y in batches:
        images = decode_blobs(blobs, meta.image_size)
        scores.append(encode(model, images, mean, std, device).cpu())
        ys.append(torch.as_tensor(y))
    top1, top5 = topk_accuracy(torch.cat(scores), torch.cat(ys))
    return {"top1": top1, "top5": top5}


def _labeled(ds: ImageDataset, split: str) -> tuple[list[bytes], np.ndarray]:
    t = ds.read_table(["id", "image", "label"], split=split).sort_by("id")
    labels = t["label"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    keep = np.flatnonzero(labels >= 0)
    blobs = t["image"].to_pylist()
    return [blobs[i] for i in keep], labels[keep]


def run_semisup(
    checkpoint_uri: str,
    dataset_uri: str,
    fraction: float,
    train_split: str = "train",
    test_split: str = "test",
    cfg: FinetuneConfig | None = None,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Fine-tune on a balanced ``fraction`` of ``train_split``'s labels; score ``test_split``.

    ``seed`` fixes the label subset, the head's initialisation and the augmentation.
    """
    cfg = cfg or FinetuneConfig()
    cfg.validate()
    epochs = cfg.epochs or protocol_epochs(fraction)
    cfg = replace(cfg, epochs=epochs)
    ds = ImageDataset.open(dataset_uri)
    check_split(ds, train_split, need_labels=True, why="semi-supervised fine-tuning")
    check_split(ds, test_split, need_labels=True, why="semi-supervised evaluation")
    backbone, meta, sha = load_backbone(checkpoint_uri)
    blobs, labels = _labeled(ds, train_split)
    num_classes = max(len(ds.classes), int(labels.max()) + 1)
    idx = balanced_subset(labels, fraction, seed, ds.classes)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)  # the head's initialisation
    model = Classifier(backbone, meta.feat_dim, num_classes)
    finetune(model, meta, [blobs[i] for i in idx], labels[idx], cfg, dev, seed)
    test_blobs, test_labels = _labeled(ds, test_split)
    bs = cfg.eval_batch_size
    batches = (
        (test_blobs[i : i + bs], test_labels[i : i + bs]) for i in range(0, len(test_blobs), bs)
    )
    return {
        **evaluate(model, meta, batches, dev),
        "fraction": fraction,
        "num_labeled": int(len(idx)),
        "test_size": int(len(test_blobs)),
        "epochs": epochs,
        "batch_size": min(cfg.batch_size, len(idx)),
        "steps": finetune_steps(len(idx), cfg.batch_size, epochs),
        "checkpoint_sha256": sha,
    }
