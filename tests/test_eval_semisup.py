"""Semi-supervised evaluation: the label subset is balanced and seeded; fine-tuning follows
SimCLR's protocol (every labeled image each epoch, 60/30 epochs at 1%/10%) and learns."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
import torch

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.errors import SeppError
from sepp_ray.eval import semisup
from sepp_ray.eval.semisup import (
    Classifier,
    FinetuneConfig,
    balanced_subset,
    epoch_batches,
    evaluate,
    finetune,
    finetune_steps,
    protocol_epochs,
    run_semisup,
)
from sepp_ray.models.backbones import create_backbone
from sepp_ray.models.checkpoint import BackboneMeta, load_backbone, save_backbone


def test_balanced_subset_is_balanced_and_seeded() -> None:
    rng = np.random.default_rng(0)
    counts = {0: 300, 1: 120, 2: 50, 3: 1000}
    labels = rng.permutation(np.concatenate([np.full(n, c) for c, n in counts.items()]))
    labels = np.concatenate([labels, np.full(40, -1)])  # unlabeled rows are never chosen
    idx = balanced_subset(labels, 0.1, seed=3)
    assert (np.diff(idx) > 0).all()
    picked = labels[idx]
    assert (picked >= 0).all()
    assert {c: int((picked == c).sum()) for c in counts} == {0: 30, 1: 12, 2: 5, 3: 100}
    np.testing.assert_array_equal(idx, balanced_subset(labels, 0.1, seed=3))
    assert not np.array_equal(idx, balanced_subset(labels, 0.1, seed=4))
    # 1%: the class of 50 keeps round(0.5) = 1 image, the class of 120 keeps 1
    one = labels[balanced_subset(labels, 0.01, seed=0)]
    assert {c: int((one == c).sum()) for c in counts} == {0: 3, 1: 1, 2: 1, 3: 10}
    assert len(balanced_subset(labels, 1.0, seed=0)) == sum(counts.values())


def test_balanced_subset_errors_name_the_class() -> None:
    labels = np.array([0] * 100 + [1] * 3 + [2] * 100)
    with pytest.raises(SeppError, match="leaves class 'owl' empty.*3 labeled"):
        balanced_subset(labels, 0.1, seed=0, class_names=["cat", "owl", "dog"])
    with pytest.raises(SeppError, match=r"in \(0, 1\]"):
        balanced_subset(labels, 0.0, seed=0)
    with pytest.raises(SeppError, match="no labeled image"):
        balanced_subset(np.full(5, -1), 0.5, seed=0)


@pytest.mark.parametrize(
    ("n", "batch", "steps"), [(500, 256, 2), (512, 256, 2), (513, 256, 3), (5, 256, 1), (1, 4, 1)]
)
def test_every_image_is_in_one_batch_per_epoch(n: int, batch: int, steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        batches = epoch_batches(n, batch, g)
        assert len(batches) == steps == finetune_steps(n, batch, 1)
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))
        sizes = [len(b) for b in batches]
        assert max(sizes) <= min(batch, n) and max(sizes) - min(sizes) <= 1
    assert finetune_steps(500, 256, 60) == 120  # 1% of CIFAR-10 at SimCLR's 60 epochs


def test_epochs_follow_simclr_per_label_fraction() -> None:
    # arXiv 2002.05709, appendix B.5: 60 epochs with 1% of the labels, 30 with 10%
    assert protocol_epochs(0.01) == 60 and protocol_epochs(0.1) == 30
    assert protocol_epochs(0.005) == 60 and protocol_epochs(0.5) == 30
    assert FinetuneConfig().epochs is None
    FinetuneConfig().validate()
    with pytest.raises(SeppError, match="epochs"):
        FinetuneConfig(epochs=0).validate()


def _png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, value // 2)).save(buf, "PNG")
    return buf.getvalue()


def test_finetune_steps_see_every_labeled_image_each_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n, batch, epochs = 11, 4, 3
    seen: list[np.ndarray] = []
    real = semisup._image_source

    def recording(blobs: list[bytes], size: int) -> Any:
        source = real(blobs, size)
        return lambda idx: (seen.append(np.asarray(idx)), source(idx))[1]

    monkeypatch.setattr(semisup, "_image_source", recording)
    torch.manual_seed(0)
    model, dim = create_backbone("test_resnet", cifar_stem=True)
    meta = BackboneMeta("test_resnet", True, dim, 8)
    labels = np.arange(n) % 3
    cfg = FinetuneConfig(epochs=epochs, batch_size=batch)
    finetune(Classifier(model, dim, 3), meta, [_png(9 * i) for i in range(n)], labels, cfg,
             torch.device("cpu"))  # fmt: skip
    per_epoch = math.ceil(n / batch)
    assert len(seen) == epochs * per_epoch == finetune_steps(n, batch, epochs) == 9
    for e in range(epochs):
        got = np.concatenate(seen[e * per_epoch : (e + 1) * per_epoch])
        np.testing.assert_array_equal(np.sort(got), np.arange(n))
    with pytest.raises(SeppError, match="epochs"):
        finetune(Classifier(model, dim, 3), meta, [_png(0)], labels[:1], FinetuneConfig(),
                 torch.device("cpu"))  # fmt: skip


@pytest.fixture(scope="module")
def tiny(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A 16 px synthetic dataset (ingested on Ray) and a tiny CIFAR-stem ResNet checkpoint."""
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import SourceOptions, open_source

    root = tmp_path_factory.mktemp("semisup")
    data = str(root / "data")
    ingest(open_source("synthetic", options=SourceOptions(n=120, size=16)), data)
    torch.manual_seed(0)
    model, dim = create_backbone("test_resnet", cifar_stem=True)
    ckpt = str(root / "ckpt")
    save_backbone(ckpt, model, BackboneMeta("test_resnet", True, dim, 16))
    return data, ckpt


def test_finetuning_learns_the_labeled_images(tiny: tuple[str, str]) -> None:
    data, ckpt = tiny
    blobs, labels = semisup._labeled(ImageDataset.open(data), "train")
    backbone, meta, _ = load_backbone(ckpt)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    torch.manual_seed(0)
    model = Classifier(backbone, meta.feat_dim, 10)
    cpu = torch.device("cpu")
    finetune(model, meta, blobs, labels, FinetuneConfig(epochs=30, batch_size=32, lr=0.4), cpu)
    after = model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    fit = evaluate(model, meta, iter([(blobs, labels)]), cpu)
    majority = np.bincount(labels).max() / len(labels)
    assert fit["top1"] > max(0.6, 2 * majority), fit


def test_run_semisup_end_to_end(tiny: tuple[str, str]) -> None:
    data, ckpt = tiny
    cfg = FinetuneConfig(epochs=2, batch_size=16)
    res = run_semisup(ckpt, data, 0.5, cfg=cfg, seed=1)
    _, labels = semisup._labeled(ImageDataset.open(data), "train")
    assert res["num_labeled"] == len(balanced_subset(labels, 0.5, seed=1))
    assert 0.0 <= res["top1"] <= res["top5"] <= 1.0
    test_n = ImageDataset.open(data).manifest["splits"]["test"]["labeled"]
    assert res["test_size"] == test_n
    with pytest.raises(SeppError, match="split 'unlabeled' is not in"):
        run_semisup(ckpt, data, 0.5, test_split="unlabeled", cfg=cfg)
    with pytest.raises(SeppError, match="leaves class .* empty"):
        run_semisup(ckpt, data, 0.001, cfg=cfg)


def test_run_semisup_takes_simclr_epochs_unless_set(
    tiny: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, ckpt = tiny
    used: list[int | None] = []

    def record(model: Classifier, *args: Any, **kwargs: Any) -> Classifier:
        used.append(args[3].epochs)  # args: meta, blobs, labels, cfg, device, seed
        return model

    monkeypatch.setattr(semisup, "finetune", record)
    cfg = FinetuneConfig(batch_size=16)
    res = run_semisup(ckpt, data, 0.5, cfg=cfg)
    assert used[-1] == res["epochs"] == protocol_epochs(0.5) == 30
    assert res["steps"] == 30 * math.ceil(res["num_labeled"] / 16)
    monkeypatch.setattr(semisup, "protocol_epochs", lambda f: 60)  # as at 1% of the labels
    assert run_semisup(ckpt, data, 0.5, cfg=cfg)["epochs"] == used[-1] == 60
    assert run_semisup(ckpt, data, 0.5, cfg=FinetuneConfig(epochs=7))["epochs"] == used[-1] == 7


def test_finetune_config_is_checked(tiny: tuple[str, str]) -> None:
    data, ckpt = tiny
    with pytest.raises(SeppError, match="crop_scale"):
        run_semisup(ckpt, data, 0.5, cfg=FinetuneConfig(crop_scale=0.0))
