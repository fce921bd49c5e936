"""Decoding JPEG batches and taking the views' random resized crops on the training device
(`sepp_ray.train.device_decode`), run on the CPU: the boxes follow torchvision's
RandomResizedCrop, the batched resample equals torchvision's resized_crop, odd JPEGs work."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from sepp_ray.data.recipes import get_recipe
from sepp_ray.errors import SeppError
from sepp_ray.train import device_decode
from sepp_ray.train.dataplane import decode_spec
from sepp_ray.train.decode import CropSpec, DecodeSpec, decode_on_device, decode_rows
from sepp_ray.train.device_decode import (
    crop_generator,
    decode_batch,
    decode_images,
    jpeg_components,
    pack,
    resample,
    sample_boxes,
)

SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)


def _jpeg(
    arr_or_mode: np.ndarray | str, size: tuple[int, int] = (40, 30), fill: object = 0
) -> bytes:
    img = (
        Image.fromarray(arr_or_mode)
        if isinstance(arr_or_mode, np.ndarray)
        else Image.new(arr_or_mode, size, fill)  # type: ignore[arg-type]
    )
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _tv_boxes(h: int, w: int, n: int) -> np.ndarray:
    """n boxes (top, left, height, width) from torchvision's own RandomResizedCrop."""
    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    return np.array([RandomResizedCrop.get_params(img, list(SCALE), list(RATIO)) for _ in range(n)])


def _ours(h: int, w: int, n: int, seed: int = 1) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    hs, ws = torch.full((n,), float(h)), torch.full((n,), float(w))
    return sample_boxes(hs, ws, SCALE, RATIO, g).numpy()


@pytest.mark.parametrize(("h", "w"), [(256, 341), (30, 40), (500, 256)])
def test_boxes_follow_random_resized_crop_scale_and_log_ratio(h: int, w: int) -> None:
    # two-sample KS tests against torchvision's draws, 4,000 each: at alpha = 0.001 the
    # critical statistic is 1.95 * sqrt(2 / 4000) = 0.044; same-distribution samples stay below
    n = 4000
    tv, ours = _tv_boxes(h, w, n), _ours(h, w, n)
    crit = 1.95 * math.sqrt(2.0 / n)

    def stats(b: np.ndarray) -> dict[str, np.ndarray]:
        top, left, ch, cw = (b[:, i].astype(float) for i in range(4))
        return {
            "area": ch * cw / (h * w),
            "log_ratio": np.log(cw / ch),
            "top": (top + ch / 2) / h,  # centre of the box: its position distribution
            "left": (left + cw / 2) / w,
        }

    a, b = stats(tv), stats(ours)
    for key in a:
        assert ks_2samp(a[key], b[key]).statistic < crit, key
    # the test can fail: boxes drawn with a narrower scale range are told apart
    g = torch.Generator().manual_seed(2)
    hs, ws = torch.full((n,), float(h)), torch.full((n,), float(w))
    narrow = sample_boxes(hs, ws, (0.2, 1.0), RATIO, g).numpy()
    assert ks_2samp(a["area"], stats(narrow)["area"]).statistic > crit


def test_fallback_box_is_torchvision_central_crop() -> None:
    # no try fits a box of the whole area into a 300 x 41 strip: the central fallback, whose
    # side 41 * 4/3 = 54.67 rounds (55), not floors
    g = torch.Generator().manual_seed(0)
    for h, w in ((41, 300), (300, 41), (50, 60)):  # wide, tall, in range: the whole image
        ours = sample_boxes(torch.tensor([float(h)]), torch.tensor([float(w)]), (1, 1), RATIO, g)
        img = torch.zeros(1, h, w)
        want = RandomResizedCrop.get_params(img, [1.0, 1.0], list(RATIO))
        assert tuple(int(v) for v in ours[0].tolist()) == tuple(want)


def test_boxes_respect_each_images_own_size() -> None:
    rng = np.random.default_rng(0)
    n = 5000
    hs = torch.from_numpy(rng.integers(1, 400, n)).float()
    ws = torch.from_numpy(rng.integers(1, 400, n)).float()
    b = sample_boxes(hs, ws, SCALE, RATIO, torch.Generator().manual_seed(3))
    top, left, ch, cw = b.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (ch >= 1).all() and (cw >= 1).all()
    assert (top + ch <= hs).all() and (left + cw <= ws).all()
    assert torch.equal(b, b.round())  # whole pixels
    # each sample's own size: boxes of tall images are taller than those of short ones
    assert ch[hs > 300].mean() > 4 * ch[hs < 50].mean()


def test_batched_resample_equals_torchvision_resized_crop_per_sample() -> None:
    # float32 output against F.resized_crop (bilinear, antialias=False) of each image:
    # stated tolerance 1e-3 grey levels of 255 (float rounding only)
    sizes = [(30, 40), (256, 341), (17, 9), (64, 64)]
    imgs = [
        torch.from_numpy(_noise(h, w, i)).permute(2, 0, 1).contiguous()
        for i, (h, w) in enumerate(sizes)
    ]
    pixels, offsets, heights, widths = pack(imgs)
    src = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2])
    g = torch.Generator().manual_seed(0)
    boxes = sample_boxes(heights[src], widths[src], SCALE, RATIO, g)
    boxes[-1] = torch.tensor([0.0, 0.0, 17.0, 9.0])  # the whole image, upsampled
    for size in (24, 224):  # up- and down-scaling crops
        out = resample(pixels, offsets, widths, src, boxes, size)  # N x 3 x S x S
        for k, i in enumerate(src.tolist()):
            t, left, h, w = (int(v) for v in boxes[k].tolist())
            want = TF.resized_crop(imgs[i].float(), t, left, h, w, [size, size], antialias=False)
            assert (out[k] - want).abs().max().item() < 1e-3, (k, size)
    # the test can fail: a box shifted by one pixel gives another image
    shifted = boxes.clone()
    shifted[1, 1] += 1
    moved = resample(pixels, offsets, widths, src[1:2], shifted[1:2], 24)[0]
    t, left, h, w = (int(v) for v in boxes[1].tolist())
    ref = TF.resized_crop(imgs[1].float(), t, left, h, w, [24, 24], antialias=False)
    assert (moved - ref).abs().max().item() > 1.0


def _batch(blobs: list[bytes], blobs2: list[bytes | None]) -> dict[str, np.ndarray]:
    n = len(blobs)
    table = pa.table(
        {
            "id": np.arange(n, dtype=np.int64) + 100,
            "image": pa.array(blobs, pa.binary()),
            "image2": pa.array(blobs2, pa.binary()),
            "label": np.arange(n, dtype=np.int64) % 3,
            "group": np.full(n, -1, np.int64),
        }
    )
    return decode_rows(table, DecodeSpec("bytes", 16), np.random.default_rng(0))


def _crop_spec(local: bool = True) -> DecodeSpec:
    return DecodeSpec(
        "bytes",
        16,
        view1=CropSpec(16),
        view2=CropSpec(16),
        local=CropSpec(8, (0.05, 0.4)) if local else None,
        n_local=2 if local else 0,
    )


def test_views_cropped_on_the_device_from_stored_images_of_any_size() -> None:
    red, blue = (200, 20, 20), (20, 20, 200)
    sizes = [(40, 30), (30, 40), (64, 33), (41, 41)]
    blobs = [_jpeg("RGB", s, red) for s in sizes]
    blobs2 = [None, _jpeg("RGB", (50, 20), blue), None, None]  # row 1: a pair item
    batch = _batch(blobs, blobs2)
    out = decode_on_device(batch, "cpu", _crop_spec(), crop_generator("cpu", 0, 0, 0))
    assert out["image"].shape == (4, 16, 16, 3) and out["image"].dtype == torch.uint8
    assert out["image2"].shape == (4, 16, 16, 3) and out["local"].shape == (4, 2, 8, 8, 3)
    assert out.cpu_decoded == 0
    np.testing.assert_array_equal(out["id"].numpy(), batch["id"])  # other arrays unchanged
    np.testing.assert_array_equal(out["pos_ids"].numpy(), batch["pos_ids"])
    means2 = out["image2"].float().mean(dim=(1, 2))  # B x 3
    assert means2[1, 2] > 150 and means2[1, 0] < 60  # view 2 of the pair item: its positive
    assert (means2[[0, 2, 3], 0] > 150).all()  # the others: the image itself
    assert (out["local"].float().mean(dim=(2, 3))[..., 0] > 150).all()
    # seeded: the same (seed, epoch, rank) gives the same crops, another epoch others
    noisy = _batch([_jpeg(_noise(h, w, i)) for i, (w, h) in enumerate(sizes)], [None] * 4)
    spec = _crop_spec(local=False)
    a = decode_batch(noisy, "cpu", spec, crop_generator("cpu", 0, 0, 0))
    b = decode_batch(noisy, "cpu", spec, crop_generator("cpu", 0, 0, 0))
    c = decode_batch(noisy, "cpu", spec, crop_generator("cpu", 0, 1, 0))
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])
    assert "local" not in a


def test_whole_images_without_view_crops_and_mixed_sizes_refused() -> None:
    batch = _batch([_jpeg("RGB", (16, 16), (9, 9, 9))] * 3, [None] * 3)
    out = decode_batch(batch, "cpu")
    assert out["image"].shape == (3, 16, 16, 3) and out["image2"].shape == (3, 16, 16, 3)
    mixed = _batch([_jpeg("RGB", (16, 16)), _jpeg("RGB", (40, 30))], [None, None])
    with pytest.raises(SeppError, match="not stored at the training size"):
        decode_batch(mixed, "cpu")


def test_grayscale_jpeg_decodes_to_rgb() -> None:
    imgs, n_cpu = decode_images([_jpeg("L", (40, 30), 77)], torch.device("cpu"))
    assert n_cpu == 0 and imgs[0].shape == (3, 30, 40)
    assert (imgs[0].float() - 77).abs().max() <= 2


def test_cmyk_jpeg_falls_back_to_the_cpu_with_a_count() -> None:
    cmyk = _jpeg("CMYK", (40, 30), (10, 200, 30, 5))
    assert [jpeg_components(_jpeg(m, (8, 8))) for m in ("RGB", "L", "CMYK")] == [3, 1, 4]
    batch = _batch([_jpeg("RGB", (40, 30)), cmyk], [None, None])
    out = decode_batch(batch, "cpu", _crop_spec(local=False), crop_generator("cpu", 1))
    assert out.cpu_decoded == 1
    imgs, n_cpu = decode_images([cmyk], torch.device("cpu"))
    want = np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))
    assert n_cpu == 1 and np.array_equal(imgs[0].permute(1, 2, 0).numpy(), want)


def test_images_the_decoder_refuses_fall_back_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    good, bad = _jpeg("RGB", (20, 10), (1, 2, 3)), _jpeg("RGB", (12, 14), (250, 1, 1))
    real = device_decode.jpeg_decoder()

    def picky(data: list[torch.Tensor], mode: str, device: torch.device) -> list[torch.Tensor]:
        if any(len(d) == len(bad) for d in data):  # like nvJPEG on a file it cannot take
            raise RuntimeError("unsupported")
        return real(data, mode=mode, device=device)

    monkeypatch.setattr(device_decode, "jpeg_decoder", lambda: picky)
    imgs, n_cpu = decode_images([good, bad, good], torch.device("cpu"))
    assert n_cpu == 1 and [tuple(t.shape) for t in imgs] == [(3, 10, 20), (3, 14, 12), (3, 10, 20)]
    assert imgs[1][0].float().mean() > 200


def test_non_jpeg_bytes_are_refused_naming_cpu_decoding() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    with pytest.raises(SeppError, match="decode_on=cpu"):
        decode_batch(_batch([buf.getvalue()], [None]), "cpu", _crop_spec())


def test_decode_on_gpu_accepts_datasets_not_stored_at_the_training_size() -> None:
    # what the driver's decode_on=gpu check now asks: 40x30 JPEGs, training at 16 px
    recipe = get_recipe("dino", 16)
    manifest = {
        "image_size": {"width": [40, 40], "height": [30, 30], "uniform": True},
        "options": {"encoding": "jpeg"},
    }
    spec = decode_spec(manifest, 16, recipe, 1, "train", decode_on="gpu")
    assert spec.mode == "bytes" and spec.view1 == CropSpec(16, recipe.view1.crop_scale)
    assert spec.local is not None and spec.n_local == recipe.n_local
    assert decode_spec(manifest, 16, recipe, 1, "train").mode == "crop"  # decode_on=cpu
    stored = {**manifest, "image_size": {"width": [16, 16], "height": [16, 16], "uniform": True}}
    whole = decode_spec(stored, 16, recipe, 1, "train", decode_on="gpu")
    assert whole.mode == "bytes" and whole.view1 is None  # "full": the GPU recipe crops
    with pytest.raises(SeppError, match="JPEG"):
        decode_spec({**manifest, "options": {"encoding": "png"}}, 16, recipe, 1, "train", "gpu")


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_a_training_step_on_views_cropped_on_the_device(method: str) -> None:
    # the worker's path for decode_on=gpu on data stored at 40x30, training at 16 px: bytes
    # batches through `_on_device`, the GPU recipe without its crop (the device cropped)
    from sepp_ray.data.augment import GPUAugment
    from sepp_ray.methods import create_method, method_class
    from sepp_ray.train.optim import build_optimizer
    from sepp_ray.train.rank_data import _on_device
    from sepp_ray.train.step import StepConfig, Trainer, prepare_loss_module

    recipe = get_recipe(method_class(method).default_recipe, 16)
    manifest = {"image_size": {"width": [40, 40], "height": [30, 30], "uniform": True}}
    spec = decode_spec(manifest, 16, recipe, 1, "train", decode_on="gpu")
    blobs = [_jpeg(_noise(30, 40, i)) for i in range(8)]
    raw = _batch(blobs, [None] * 8)
    (batch,) = list(_on_device(iter([raw]), torch.device("cpu"), spec=spec, crop_seed=(0, 0, 0)))
    assert batch["image"].shape == (8, 16, 16, 3)
    if recipe.n_local:
        assert batch["local"].shape[:2] == (8, recipe.n_local)
    torch.manual_seed(0)
    model = create_method(method, backbone="test_resnet", cifar_stem=True)
    augment = GPUAugment(recipe.with_drop(("crop",)), seed=0)
    trainer = Trainer(
        prepare_loss_module(model, "cpu"),
        model,
        augment,
        build_optimizer("sgd", model, lr=0.1, weight_decay=0.0),
        StepConfig(),
        total_steps=2,
        warmup_steps=0,
        base_lr=0.1,
    )
    views, _, _ = trainer.views(batch)
    assert [v.shape[-1] for v in views] == [r.crop_size for r in recipe.views]
    trainer.train_step(batch, 0, 0)
    assert math.isfinite(trainer.read_metrics()["loss"])
