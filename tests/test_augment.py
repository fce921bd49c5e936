"""Batched augmentation: each op against torchvision.transforms.v2.functional on single images,
then randomness, probabilities, the drop switch and the named recipes."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from sepp_ray.data import augment as A
from sepp_ray.data.recipes import OPS, RECIPES, AugmentRecipe, TwoViewRecipe, get_recipe
from sepp_ray.errors import SeppError

ATOL = 1e-5
PLAIN: dict[str, Any] = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # outputs in [0, 1]


def _images(b: int = 6, h: int = 20, w: int = 28, seed: int = 0) -> torch.Tensor:
    """Random colour images, one of them flat grey (hue/saturation edge case): B x 3 x H x W."""
    x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
    x[0] = 0.5
    return x


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _is_gray(x: torch.Tensor) -> torch.Tensor:
    """B bool: all three channels equal."""
    return (x[:, 0] == x[:, 1]).flatten(1).all(1) & (x[:, 1] == x[:, 2]).flatten(1).all(1)


# ---- ops against torchvision, per sample


@pytest.mark.parametrize(
    ("op", "oracle", "factors"),
    [
        (A.adjust_brightness, TF.adjust_brightness, [1.0, 0.6, 1.4, 0.0, 2.0, 1.1]),
        (A.adjust_contrast, TF.adjust_contrast, [1.0, 0.6, 1.4, 0.0, 2.0, 0.9]),
        (A.adjust_saturation, TF.adjust_saturation, [1.0, 0.6, 1.4, 0.0, 2.0, 0.8]),
        (A.adjust_hue, TF.adjust_hue, [0.1, 0.05, -0.1, 0.5, -0.5, 0.33]),
    ],
)
def test_colour_ops_match_torchvision(op, oracle, factors) -> None:  # noqa: ANN001
    x = _images()
    out = op(x, torch.tensor(factors))
    for i, f in enumerate(factors):
        torch.testing.assert_close(out[i], oracle(x[i], f), atol=ATOL, rtol=0)


def test_hue_zero_is_exact_identity() -> None:
    x = _images()
    out = A.adjust_hue(x, torch.tensor([0.0, 0.2, 0.0, 0.0, 0.0, 0.0]))
    assert torch.equal(out[2:], x[2:])
    assert not torch.allclose(out[1], x[1])


def test_grayscale_flip_solarize_match_torchvision() -> None:
    x = _images()
    mask = torch.tensor([True, False, True, False, False, True])
    gray = A.grayscale(x, mask)
    flip = A.hflip(x, mask)
    sol = A.solarize(x, mask, 0.5)
    for i, m in enumerate(mask.tolist()):
        ref_gray = TF.rgb_to_grayscale(x[i], num_output_channels=3) if m else x[i]
        torch.testing.assert_close(gray[i], ref_gray, atol=ATOL, rtol=0)
        assert torch.equal(flip[i], TF.horizontal_flip(x[i]) if m else x[i])
        assert torch.equal(sol[i], TF.solarize(x[i], 0.5) if m else x[i])


@pytest.mark.parametrize("antialias", [False, True])
def test_resized_crop_matches_torchvision(antialias: bool) -> None:
    x = _images(h=20, w=28)
    # top, left, height, width: down- and up-scaling, the full image, a thin strip, a corner
    boxes = torch.tensor([[2, 3, 10, 12], [0, 0, 20, 28], [5, 1, 15, 7], [1, 2, 3, 5]] * 2)[:6]
    boxes[5] = torch.tensor([17, 25, 3, 3])
    out = A.resized_crop(x, boxes.float(), 16, antialias=antialias)
    assert out.shape == (6, 3, 16, 16)
    for i, (t, left, h, w) in enumerate(boxes.tolist()):
        ref = TF.resized_crop(x[i], t, left, h, w, [16, 16], antialias=antialias)
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)


def test_gaussian_blur_matches_torchvision_per_sample_sigma() -> None:
    x = _images(h=16, w=16)
    sigma = torch.tensor([0.0, 0.1, 0.5, 1.0, 1.7, 2.0])
    out = A.gaussian_blur(x, sigma, kernel_size=5)
    assert torch.equal(out[0], x[0])  # sigma 0: untouched
    for i in range(1, 6):
        ref = TF.gaussian_blur(x[i], [5, 5], [sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)


def test_whole_view_matches_torchvision_pipeline() -> None:
    """apply_view with sampled params equals the per-image torchvision chain in our fixed order."""
    recipe = AugmentRecipe(16, p_flip=0.5, p_jitter=0.5, p_gray=0.3, p_blur=0.5, p_solarize=0.3)
    x = _images(b=16, h=24, w=20)
    p = A.sample_params(recipe, 16, 24, 20, _gen(1))
    out = A.apply_view((x * 255).round().to(torch.uint8), recipe, p)
    xq = (x * 255).round() / 255  # the uint8 input, as float
    k = recipe.blur_kernel_size
    for i in range(16):
        t, left, h, w = (int(v) for v in p.boxes[i].tolist())
        y = TF.resized_crop(xq[i], t, left, h, w, [16, 16], antialias=False)
        y = TF.horizontal_flip(y) if p.flip[i] else y
        y = TF.adjust_brightness(y, p.brightness[i].item())
        y = TF.adjust_contrast(y, p.contrast[i].item())
        y = TF.adjust_saturation(y, p.saturation[i].item())
        y = TF.adjust_hue(y, p.hue[i].item()) if p.hue[i] != 0 else y
        y = TF.rgb_to_grayscale(y, num_output_channels=3) if p.gray[i] else y
        y = TF.gaussian_blur(y, [k, k], [p.blur_sigma[i].item()] * 2) if p.blur_sigma[i] else y
        y = TF.solarize(y, 0.5) if p.solarize[i] else y
        y = TF.normalize(y, list(recipe.mean), list(recipe.std))
        torch.testing.assert_close(out[i], y, atol=1e-4, rtol=0)
    # the draw exercised every op on some samples and skipped it on others
    for flags in (p.flip, p.hue != 0, p.gray, p.blur_sigma > 0, p.solarize):
        assert 0 < int(flags.sum()) < 16


# ---- crop sampling


def test_crop_boxes_follow_torchvision_distribution() -> None:
    h, w, n = 24, 40, 2000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = A.sample_crop_boxes(n, h, w, scale, ratio, _gen(0))
    top, left, bh, bw = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all())
    assert bool((top + bh <= h).all() and (left + bw <= w).all())
    assert torch.equal(boxes, boxes.round())
    torch.manual_seed(0)
    tv = T.RandomResizedCrop(8, scale=scale, ratio=ratio)
    ref = [tv.make_params([torch.zeros(3, h, w)]) for _ in range(n)]
    ref_area = torch.tensor([r["height"] * r["width"] / (h * w) for r in ref])
    ref_aspect = torch.tensor([r["width"] / r["height"] for r in ref]).log()
    ref_top = torch.tensor([r["top"] / h for r in ref])
    assert abs((bh * bw / (h * w)).mean() - ref_area.mean()) < 0.03
    assert abs((bw / bh).log().mean() - ref_aspect.mean()) < 0.03
    assert abs((top / h).mean() - ref_top.mean()) < 0.03


def test_crop_fallback_is_torchvision_central_crop() -> None:
    boxes = A.sample_crop_boxes(5, 32, 32, (0.9, 1.0), (5.0, 6.0), _gen(0))  # no try fits
    ref = T.RandomResizedCrop(8, scale=(0.9, 1.0), ratio=(5.0, 6.0)).make_params(
        [torch.zeros(3, 32, 32)]
    )
    expect = torch.tensor([ref["top"], ref["left"], ref["height"], ref["width"]]).float()
    assert torch.equal(boxes, expect.expand(5, 4))


# ---- randomness, reproducibility, probabilities


def test_params_differ_per_sample() -> None:
    x = _images(b=2)[1:].expand(32, -1, -1, -1)  # 32 copies of one (non-grey) image
    aug = A.GPUAugment(get_recipe("byol", 16), seed=0)
    v1, v2 = aug(x)
    flat = v1.flatten(1)
    assert len({tuple(r.tolist()) for r in flat}) == 32
    p = A.sample_params(get_recipe("simclr", 16).view1, 32, 20, 28, _gen(0))
    assert p.boxes.unique(dim=0).shape[0] > 16
    assert p.brightness.unique().numel() > 16
    assert not torch.equal(v1, v2)


def test_seed_reproduces_and_generator_advances() -> None:
    x = (_images(b=8) * 255).to(torch.uint8)
    recipe = get_recipe("dino", 16)
    a, b, c = (A.GPUAugment(recipe, seed=s) for s in (3, 3, 4))
    va, vb, vc = a(x), b(x), c(x)
    assert all(torch.equal(p, q) for p, q in zip(va, vb, strict=True))
    assert not torch.equal(va[0], vc[0])
    assert not torch.equal(a(x)[0], va[0])  # the next batch gets fresh parameters


def test_probabilities_are_honoured() -> None:
    n = 2000
    gray_only = AugmentRecipe(8, p_flip=0.0, p_jitter=0.0, p_gray=0.2, **PLAIN)
    x = torch.rand(n, 3, 8, 8, generator=_gen(0))
    out = A.GPUAugment(TwoViewRecipe(gray_only, gray_only), seed=0).one_view(x, gray_only)
    assert abs(_is_gray(out).float().mean().item() - 0.2) < 0.036  # 4 standard errors
    r = AugmentRecipe(8, p_flip=0.5, p_jitter=0.8, p_gray=0.0, p_blur=0.3, p_solarize=0.1)
    p = A.sample_params(r, n, 8, 8, _gen(1))
    for flags, prob in ((p.flip, 0.5), (p.brightness != 1, 0.8), (p.blur_sigma > 0, 0.3)):
        assert abs(flags.float().mean().item() - prob) < 0.045
    assert abs(p.solarize.float().mean().item() - 0.1) < 0.03
    assert not p.gray.any()
    assert float(p.blur_sigma.max()) <= 2.0 and float(p.blur_sigma[p.blur_sigma > 0].min()) >= 0.1


# ---- the drop switch


def test_drop_grayscale_beats_p_gray_one() -> None:
    x = _images(b=8)
    r = AugmentRecipe(16, p_gray=1.0, **PLAIN)
    aug = A.GPUAugment(TwoViewRecipe(r, r), seed=0)
    assert _is_gray(aug.one_view(x, r)).all()
    dropped = dataclasses.replace(r, drop=frozenset({"grayscale"}))
    assert not _is_gray(aug.one_view(x[1:], dropped)).any()  # x[0] is grey by construction


def test_drop_crop_keeps_full_field_of_view() -> None:
    x = _images(b=4, h=24, w=40)
    r = get_recipe("simclr", 16, drop=["crop", "flip", "jitter", "grayscale"]).view1
    r = dataclasses.replace(r, **PLAIN)
    out = A.GPUAugment(TwoViewRecipe(r, r), seed=0).one_view(x, r)
    ref = TF.resize(x, [16, 16], antialias=False)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("op", sorted(OPS))
def test_drop_removes_only_that_op(op: str) -> None:
    base = AugmentRecipe(16, p_blur=0.5, p_solarize=0.5)
    p = A.sample_params(base, 200, 20, 28, _gen(0))
    q = A.sample_params(dataclasses.replace(base, drop=frozenset({op})), 200, 20, 28, _gen(0))
    changed = {
        "crop": not torch.equal(p.boxes, q.boxes),
        "flip": not torch.equal(p.flip, q.flip),
        "jitter": not torch.equal(p.brightness, q.brightness),
        "grayscale": not torch.equal(p.gray, q.gray),
        "blur": not torch.equal(p.blur_sigma, q.blur_sigma),
        "solarize": not torch.equal(p.solarize, q.solarize),
    }
    assert {k for k, v in changed.items() if v} == {op}  # same seed: the rest stays identical
    neutral = {
        "crop": bool((q.boxes == torch.tensor([0.0, 0.0, 20.0, 28.0])).all()),
        "flip": not q.flip.any(),
        "jitter": bool((q.brightness == 1).all() and (q.hue == 0).all()),
        "grayscale": not q.gray.any(),
        "blur": not q.blur_sigma.any(),
        "solarize": not q.solarize.any(),
    }
    assert neutral[op]


def test_unknown_drop_op_is_refused() -> None:
    with pytest.raises(SeppError, match="colour"):
        get_recipe("simclr", 32, drop=["colour"])
    with pytest.raises(SeppError, match="grayscale"):
        AugmentRecipe(32, drop=frozenset({"greyscale"}))


# ---- outputs, recipes, errors


def test_output_dtype_layout_and_normalisation() -> None:
    x = (_images(b=4, h=16, w=16) * 255).round().to(torch.uint8)
    ident = AugmentRecipe(16, drop=OPS)
    aug = A.GPUAugment(TwoViewRecipe(ident, ident), seed=0)
    out = aug.one_view(x, ident)
    mean = torch.tensor(ident.mean).view(1, 3, 1, 1)
    std = torch.tensor(ident.std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (x / 255 - mean) / std, atol=ATOL, rtol=0)
    torch.testing.assert_close(aug.one_view(x.float() / 255, ident), out, atol=ATOL, rtol=0)
    half = A.GPUAugment(get_recipe("simclr", 12), seed=0, dtype=torch.bfloat16, channels_last=True)
    v1, v2 = half(x)
    assert v1.shape == v2.shape == (4, 3, 12, 12) and v1.dtype == torch.bfloat16
    assert v1.is_contiguous(memory_format=torch.channels_last)


def test_pair_views_take_view1_from_a_and_view2_from_b() -> None:
    a, b = _images(b=4, h=16, w=16, seed=1), _images(b=4, h=16, w=16, seed=2)
    ident = AugmentRecipe(16, drop=OPS, **PLAIN)
    v1, v2 = A.GPUAugment(TwoViewRecipe(ident, ident), seed=0).pair_views(a, b)
    torch.testing.assert_close(v1, a, atol=ATOL, rtol=0)
    torch.testing.assert_close(v2, b, atol=ATOL, rtol=0)
    with pytest.raises(SeppError, match="differ"):
        A.GPUAugment(TwoViewRecipe(ident, ident)).pair_views(a, b[:3])


def test_byol_recipe_is_asymmetric() -> None:
    r = get_recipe("byol", 96)
    assert (r.view1.p_blur, r.view1.p_solarize, r.view2.p_blur, r.view2.p_solarize) == (
        1.0,
        0.0,
        0.1,
        0.2,
    )
    assert (r.view1.brightness, r.view1.contrast, r.view1.saturation, r.view1.hue) == (
        0.4,
        0.4,
        0.2,
        0.1,
    )
    p1 = A.sample_params(r.view1, 1000, 96, 96, _gen(0))
    p2 = A.sample_params(r.view2, 1000, 96, 96, _gen(1))
    assert bool((p1.blur_sigma > 0).all()) and not p1.solarize.any()
    assert abs((p2.blur_sigma > 0).float().mean().item() - 0.1) < 0.04
    assert abs(p2.solarize.float().mean().item() - 0.2) < 0.05
    assert get_recipe("byol", 32).view1.p_blur == 0.0  # no blur in the 32 px setups
    assert get_recipe("simclr", 32).view1.p_blur == 0.0
    assert get_recipe("simclr", 96).view1.p_blur == 0.5


def test_dino_multi_crop_shapes() -> None:
    x = (_images(b=3, h=64, w=64) * 255).to(torch.uint8)
    r = get_recipe("dino", 64)
    views = A.GPUAugment(r, seed=0)(x)
    assert len(views) == 2 + r.n_local == 10
    assert [tuple(v.shape) for v in views] == [(3, 3, 64, 64)] * 2 + [(3, 3, 27, 27)] * 8
    two = A.GPUAugment(dataclasses.replace(r, n_local=0), seed=0)(x)
    assert len(two) == 2


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("size", [32, 96])
def test_every_named_recipe_runs(name: str, size: int) -> None:
    r = get_recipe(name, size)
    assert r.name == name
    x = (_images(b=2, h=size, w=size) * 255).to(torch.uint8)
    views = A.GPUAugment(r, seed=0)(x)
    assert len(views) == 2 + r.n_local
    for v, vr in zip(views, r.views, strict=True):
        assert v.shape == (2, 3, vr.crop_size, vr.crop_size) and torch.isfinite(v).all()


def test_bad_inputs_raise_sepp_error() -> None:
    with pytest.raises(SeppError) as err:
        get_recipe("moco", 32)
    assert all(n in str(err.value) for n in RECIPES)
    for bad in (dict(p_gray=1.5), dict(crop_scale=(0.5, 0.2)), dict(hue=0.7), dict(std=(1, 0, 1))):
        with pytest.raises(SeppError):
            AugmentRecipe(32, **bad)  # type: ignore[arg-type]
    with pytest.raises(SeppError, match="local"):
        TwoViewRecipe(AugmentRecipe(8), AugmentRecipe(8), n_local=2)
    aug = A.GPUAugment(get_recipe("simclr", 8), seed=0)
    with pytest.raises(SeppError, match="B x 3 x H x W"):
        aug(torch.zeros(2, 1, 8, 8))
    with pytest.raises(SeppError, match="uint8 or float"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.int32))


@pytest.mark.gpu
def test_cuda_matches_cpu_without_host_syncs() -> None:
    x = (_images(b=8, h=24, w=24) * 255).to(torch.uint8)
    r = get_recipe("byol", 96).view2
    r = dataclasses.replace(r, crop_size=16, p_blur=0.5)
    p = A.sample_params(r, 8, 24, 24, _gen(0))
    cpu = A.apply_view(x, r, p)
    dev = torch.device("cuda")
    pc = A.ViewParams(*(getattr(p, f.name).to(dev) for f in dataclasses.fields(p)))
    torch.testing.assert_close(A.apply_view(x.to(dev), r, pc).cpu(), cpu, atol=1e-4, rtol=0)
    aug = A.GPUAugment(get_recipe("dino", 32), seed=0)
    xd = x.to(dev)
    aug(xd)  # warm-up: constants are copied to the device once
    torch.cuda.set_sync_debug_mode("error")
    try:
        aug(xd)
    finally:
        torch.cuda.set_sync_debug_mode("default")
