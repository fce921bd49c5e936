"""VOC reading, COCO conversion scored by pycocotools, and Faster R-CNN + FPN end to end."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sepp_ray.errors import SeppError
from sepp_ray.eval.detection import (
    DetectionConfig,
    coco_ap,
    freeze_batchnorm,
    resnet_fpn,
    run_detection,
)
from sepp_ray.eval.voc import class_names, read_voc, to_coco, write_toy_voc
from sepp_ray.models.backbones import create_backbone
from sepp_ray.models.checkpoint import BackboneMeta, save_backbone


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("voc")
    write_toy_voc(root, n_train=8, n_val=4, size=64, seed=0)
    return str(root)


def test_toy_voc_is_real_voc(voc: str) -> None:
    train, val = read_voc(voc, "train"), read_voc(voc, "val")
    assert len(train) == 8 and len(val) == 4
    for it in train + val:
        with Image.open(it.path) as img:
            assert img.format == "JPEG" and img.size == (64, 64)
        # the XML is VOC's: 1-based inclusive corners, read back 0-based exclusive
        root = ET.parse(Path(voc) / "Annotations" / f"{it.image_id}.xml").getroot()
        xmin = [int(str(o.findtext("bndbox/xmin"))) for o in root.findall("object")]
        np.testing.assert_array_equal(it.boxes[:, 0], np.array(xmin) - 1)
        assert (it.boxes[:, :2] >= 0).all() and (it.boxes[:, 2:] <= 64).all()
        assert (it.boxes[:, 2:] > it.boxes[:, :2]).all()
    assert set(class_names(train, val)) <= {"disc", "square", "triangle"}


def test_pycocotools_scores_perfect_and_shifted_boxes(voc: str) -> None:
    val = read_voc(voc, "val")
    gt = to_coco(val, class_names(read_voc(voc, "train"), val))
    exact = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in gt["annotations"]
    ]
    assert coco_ap(gt, exact) == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}
    # shift each box right by 20% of its width: IoU = 0.8 / 1.2 = 0.67, a hit at 0.5, not 0.75
    shifted = [{**d, "bbox": [d["bbox"][0] + 0.2 * d["bbox"][2], *d["bbox"][1:]]} for d in exact]
    res = coco_ap(gt, shifted)
    assert res["AP50"] == pytest.approx(1.0) and res["AP75"] == 0.0
    assert 0.0 < res["AP"] < 1.0
    assert coco_ap(gt, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_difficult_objects_are_ignored(voc: str) -> None:
    val = read_voc(voc, "val")
    it = val[0]
    hard = type(it)(
        it.image_id, it.path, it.width, it.height, it.boxes, it.names, np.ones(len(it.names), bool)
    )
    gt = to_coco([hard, *val[1:]], ["disc", "square", "triangle"])
    dets = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]
    # no detection for the difficult objects, and still a perfect score
    assert coco_ap(gt, dets)["AP"] == 1.0


def test_frozen_batchnorm_keeps_the_function() -> None:
    torch.manual_seed(0)
    model, _ = create_backbone("test_resnet")
    model.train()
    model(torch.randn(4, 3, 32, 32))  # move the running statistics off their defaults
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    after = freeze_batchnorm(model)(x)
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_non_resnet_backbone_is_refused() -> None:
    vit, _ = create_backbone("test_vit")
    with pytest.raises(SeppError, match="needs a ResNet backbone.*'test_vit'"):
        resnet_fpn(vit, "test_vit")


def test_fpn_levels_and_trainable_layers() -> None:
    model, _ = create_backbone("test_resnet")
    fpn = resnet_fpn(model, "test_resnet", trainable_layers=2)
    feats = fpn(torch.randn(1, 3, 64, 64))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]
    assert all(f.shape[1] == 256 for f in feats.values())
    trained = {n.split(".")[0] for n, p in fpn.body.named_parameters() if p.requires_grad}
    assert trained == {"layer3", "layer4"}


def test_detection_end_to_end(voc: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, dim = create_backbone("test_resnet")
    ckpt = str(tmp_path / "ckpt")
    save_backbone(ckpt, model, BackboneMeta("test_resnet", False, dim, 64))
    cfg = DetectionConfig(
        iters=6,
        batch_size=2,
        min_size=64,
        max_size=64,
        anchor_sizes=[8, 16, 32, 64, 128],
        box_rois=32,
        proposals=100,
    )
    res = run_detection(ckpt, voc, cfg)
    for k in ("AP", "AP50", "AP75"):
        assert math.isfinite(res[k]) and 0.0 <= res[k] <= 1.0
    assert res["AP50"] >= res["AP"] >= 0.0 and res["AP50"] >= res["AP75"]
    assert res["train_images"] == 8 and res["test_images"] == 4
    with pytest.raises(SeppError, match="split 'test'.*'train', 'val'"):
        run_detection(ckpt, voc, DetectionConfig(test_split="test"))
