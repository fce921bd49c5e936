"""Detection transfer: Faster R-CNN with FPN on a pretrained ResNet, trained and scored on VOC.

MoCo (arXiv 1911.05722) made VOC detection the standard transfer test of self-supervised
backbones: the pretrained ResNet initialises a Faster R-CNN (Ren et al. arXiv 1506.01497) with a
feature pyramid (Lin et al. arXiv 1612.03144), the whole detector is fine-tuned, and AP, AP50
and AP75 are reported. This uses torchvision's FasterRCNN and BackboneWithFPN around the
checkpoint's timm (or torchvision) ResNet, with frozen BatchNorm as is usual for the small
per-device batches of detection, and pycocotools for the AP figures. Plain PyTorch: the eval
command runs it as a Ray task.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # torchvision's detection stack is imported where used: it slows `sepp` start
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

from sepp_ray.config import opt
from sepp_ray.errors import SeppError
from sepp_ray.eval.voc import VocImage, class_names, read_image, read_voc, to_coco
from sepp_ray.models.checkpoint import BackboneMeta, load_backbone

_STAGES = ("layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class DetectionConfig:
    """How the detector is trained and scored."""

    train_split: str = opt("train", "VOC image set to train on (ImageSets/Main/<name>.txt)")
    test_split: str = opt("val", "VOC image set to score")
    iters: int = opt(6000, "training iterations")
    batch_size: int = opt(8, "images per iteration")
    lr: float = opt(0.02, "SGD learning rate at batch 16 (scaled linearly with batch_size)")
    weight_decay: float = opt(1e-4, "SGD weight decay")
    warmup_iters: int = opt(100, "linear warm-up iterations")
    min_size: int = opt(800, "shorter image side the detector resizes to")
    max_size: int = opt(1333, "longest image side the detector allows")
    anchor_sizes: list[int] = opt(
        [32, 64, 128, 256, 512], "anchor side per pyramid level (P2..P6), in pixels"
    )
    box_rois: int = opt(512, "sampled RoIs per image for the box head's loss")
    proposals: int = opt(2000, "RPN proposals kept per image (training and test)")
    trainable_layers: int = opt(5, "ResNet stages trained, from the top (5 = all, 0 = none)")
    freeze_bn: bool = opt(True, "replace BatchNorm by FrozenBatchNorm (its statistics kept)")

    def validate(self) -> None:
        if self.iters < 1 or self.batch_size < 1:
            raise SeppError("detection iters and batch_size must be >= 1")
        if len(self.anchor_sizes) != 5:
            raise SeppError(f"anchor_sizes needs 5 sizes (P2..P6), got {self.anchor_sizes}")
        if self.box_rois < 1 or self.proposals < 1:
            raise SeppError("detection box_rois and proposals must be >= 1")
        if not 0 <= self.trainable_layers <= 5:
            raise SeppError(f"trainable_layers must be in 0..5, got {self.trainable_layers}")


def _is_resnet(m: nn.Module) -> bool:
    names = {n for n, _ in m.named_children()}
    return {"conv1", "bn1", "maxpool", *_STAGES} <= names


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d -> FrozenBatchNorm2d with its affine weights and running statistics."""
    from torchvision.ops import FrozenBatchNorm2d

    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.running_mean is not None and module.running_var is not None:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        setattr(module, name, freeze_batchnorm(child))
    return module


def resnet_fpn(
    backbone: nn.Module, arch: str, trainable_layers: int = 5, freeze_bn: bool = True
) -> BackboneWithFPN:
    """A ResNet's four stages (strides 4..32) under a 256-channel FPN with a P6 max-pool level."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    if not _is_resnet(backbone):
        raise SeppError(
            f"detection needs a ResNet backbone (timm resnet18/50/..., with conv1, bn1, "
            f"maxpool, layer1..layer4), but the checkpoint's architecture is {arch!r} "
            f"({type(backbone).__name__}): evaluate it with knn/linear/semisup instead"
        )
    if freeze_bn:
        backbone = freeze_batchnorm(backbone)
    trained = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trained.append("bn1")
    for name, p in backbone.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in trained))
    was_training = backbone.training
    backbone.eval()  # the probe forward must not touch BatchNorm statistics
    with torch.no_grad():
        x = torch.zeros(1, 3, 64, 64)
        channels = []
        for name, child in backbone.named_children():
            if name in ("global_pool", "fc", "avgpool", "head"):
                break
            x = child(x)
            if name in _STAGES:
                channels.append(int(x.shape[1]))
    backbone.train(was_training)
    return BackboneWithFPN(
        backbone,
        return_layers={s: str(i) for i, s in enumerate(_STAGES)},
        in_channels_list=channels,
        out_channels=256,
        extra_blocks=LastLevelMaxPool(),
    )


def build_detector(
    backbone: nn.Module, meta: BackboneMeta, num_classes: int, cfg: DetectionConfig
) -> FasterRCNN:
    """Faster R-CNN for ``num_classes`` object classes (+ background) on the checkpoint's ResNet."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    fpn = resnet_fpn(backbone, meta.name, cfg.trainable_layers, cfg.freeze_bn)
    anchors = AnchorGenerator(
        tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes)
    )
    return FasterRCNN(
        fpn,
        num_classes=num_classes + 1,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        image_mean=list(meta.mean),
        image_std=list(meta.std),
        rpn_anchor_generator=anchors,
        rpn_post_nms_top_n_train=cfg.proposals,
        rpn_post_nms_top_n_test=min(cfg.proposals, 1000),
        box_batch_size_per_image=cfg.box_rois,
    )


def _sample(
    root: str, item: VocImage, classes: dict[str, int], flip: bool, device: torch.device
) -> tuple[Tensor, dict[str, Tensor]]:
    """Image (3 x H x W in [0, 1]) and target; difficult objects are left out of training."""
    img = torch.from_numpy(read_image(root, item)).permute(2, 0, 1).float().div_(255.0)
    keep = [i for i, n in enumerate(item.names) if n in classes and not item.difficult[i]]
    boxes = torch.from_numpy(item.boxes[keep]).reshape(-1, 4)  # K x 4 (x1, y1, x2, y2)
    labels = torch.tensor([classes[item.names[i]] for i in keep], dtype=torch.long)
    if flip:
        img = img.flip(-1)
        boxes = torch.stack(
            (img.shape[-1] - boxes[:, 2], boxes[:, 1], img.shape[-1] - boxes[:, 0], boxes[:, 3]),
            dim=1,
        )
    return img.to(device), {"boxes": boxes.to(device), "labels": labels.to(device)}


def train_detector(
    model: FasterRCNN,
    root: str,
    items: list[VocImage],
    classes: list[str],
    cfg: DetectionConfig,
    device: torch.device,
    seed: int = 0,
) -> FasterRCNN:
    """SGD with momentum, linear warm-up then cosine decay, random horizontal flips."""
    index = {c: i + 1 for i, c in enumerate(classes)}
    params = [p for p in model.parameters() if p.requires_grad]
    bs = min(cfg.batch_size, len(items))
    opt = torch.optim.SGD(params, lr=cfg.lr * bs / 16, momentum=0.9, weight_decay=cfg.weight_decay)

    def factor(it: int) -> float:
        if it < cfg.warmup_iters:
            return 0.001 + (1 - 0.001) * it / cfg.warmup_iters
        return 0.5 * (1 + math.cos(math.pi * (it - cfg.warmup_iters) / max(1, cfg.iters)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    model.to(device).train()
    for _ in range(cfg.iters):
        if len(order) < bs:
            order.extend(rng.permutation(len(items)).tolist())
        batch, order = order[:bs], order[bs:]
        samples = [_sample(root, items[i], index, bool(rng.random() < 0.5), device) for i in batch]
        losses = model([s[0] for s in samples], [s[1] for s in samples])
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise SeppError(f"detection training diverged ({losses}): lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def detect(
    model: FasterRCNN, root: str, items: list[VocImage], device: torch.device, batch: int = 8
) -> list[dict[str, Any]]:
    """COCO-format results (image_id = list position, category_id = class index + 1)."""
    model.eval()
    out: list[dict[str, Any]] = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        images = [
            torch.from_numpy(read_image(root, it)).permute(2, 0, 1).float().div_(255.0).to(device)
            for it in chunk
        ]
        for j, pred in enumerate(model(images)):
            for box, label, score in zip(
                pred["boxes"].cpu().tolist(),
                pred["labels"].cpu().tolist(),
                pred["scores"].cpu().tolist(),
                strict=True,
            ):
                x1, y1, x2, y2 = box
                out.append(
                    {
                        "image_id": start + j,
                        "category_id": int(label),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score),
                    }
                )
    return out


def coco_ap(gt: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, float]:
    """AP (IoU 0.50:0.95), AP50 and AP75 from pycocotools; no detection scores 0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not any(not a["iscrowd"] for a in gt["annotations"]):
        raise SeppError("the test split holds no (non-difficult) object of a trained class")
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (max(0.0, float(v)) for v in ev.stats[:3])
    return {"AP": ap, "AP50": ap50, "AP75": ap75}


def run_detection(
    checkpoint_uri: str,
    voc_root: str,
    cfg: DetectionConfig | None = None,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Train on ``cfg.train_split`` of the VOC root, score ``cfg.test_split``.

    ``seed`` fixes the heads' initialisation, the batch order and the flips.
    """
    cfg = cfg or DetectionConfig()
    cfg.validate()
    backbone, meta, sha = load_backbone(checkpoint_uri)
    train = read_voc(voc_root, cfg.train_split)
    test = read_voc(voc_root, cfg.test_split)
    classes = class_names(train)
    if not classes:
        raise SeppError(f"split {cfg.train_split!r} of {voc_root} holds no annotated object")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)  # the FPN and heads' initialisation
    model = build_detector(backbone, meta, len(classes), cfg)
    train_detector(model, voc_root, train, classes, cfg, dev, seed)
    metrics = coco_ap(to_coco(test, classes), detect(model, voc_root, test, dev))
    return {
        **metrics,
        "voc_root": voc_root,
        "classes": classes,
        "train_images": len(train),
        "test_images": len(test),
        "iters": cfg.iters,
        "checkpoint_sha256": sha,
    }
