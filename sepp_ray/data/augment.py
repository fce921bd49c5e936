"""Batched SSL augmentation on the training device, with per-sample random parameters.

CPU torchvision augmentation tops out near 7,100 SimCLR pairs/s with 16 workers while a GPU does
millions of views/s (DESIGN.md), so views are made here, on the batch, on the input's device.

Every op is a pure function of the batch and per-sample parameter tensors (tests pass fixed ones)
and matches `torchvision.transforms.v2.functional` on float tensors, with these differences:
  - resampling is bilinear without antialiasing by default, like `F.resized_crop(...,
    antialias=False)`; torchvision's PIL path (and `antialias=True`) low-pass filters when a crop
    is shrunk, which matters only for crops larger than the view. `AugmentRecipe.antialias=True`
    reproduces `antialias=True` with separable tent-filter matrices, at extra cost.
  - colour jitter runs in the fixed order brightness -> contrast -> saturation -> hue;
    torchvision's `ColorJitter` draws a random order per image.
No op reads values back to the host (no `.item()`, no boolean indexing): ops not applied to a
sample get identity parameters, so the pipeline never synchronises the GPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sepp_ray.data.recipes import AugmentRecipe, TwoViewRecipe
from sepp_ray.errors import SeppError

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's (ITU-R 601) luma weights


@dataclass(frozen=True)
class ViewParams:
    """Per-sample parameters of one view; identity values mean "op not applied"."""

    boxes: Tensor  # B x 4 float: top, left, height, width of the crop, in source pixels
    flip: Tensor  # B bool
    brightness: Tensor  # B float, 1 = unchanged
    contrast: Tensor  # B float, 1 = unchanged
    saturation: Tensor  # B float, 1 = unchanged
    hue: Tensor  # B float in [-0.5, 0.5], 0 = unchanged
    gray: Tensor  # B bool
    blur_sigma: Tensor  # B float, 0 = no blur
    solarize: Tensor  # B bool


@functools.lru_cache(maxsize=64)
def _const(values: tuple[Any, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A host constant on `device`, copied once: a blocking copy per call would stall the GPU."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _col(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)  # B -> B x 1 x 1 x 1


def to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def _bilinear_coords(start: Tensor, length: Tensor, size: int) -> Tensor:
    """Source coordinates (B x size) of `interpolate(crop, bilinear, align_corners=False)`:
    pixel centres mapped back, clamped to the crop so edges replicate the crop, not the image."""
    o = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5  # size
    src = o * (length[:, None] / size) - 0.5  # B x size, relative to the crop
    return start[:, None] + torch.minimum(src.clamp(min=0.0), length[:, None] - 1.0)


def _antialias_weights(start: Tensor, length: Tensor, size: int, in_size: int) -> Tensor:
    """Resampling matrices (B x size x in_size) of `interpolate(..., antialias=True)`: a tent
    filter widened by the downscale factor, renormalised inside the crop."""
    scale = length / size  # B
    support = scale.clamp(min=1.0)[:, None, None]  # B x 1 x 1
    o = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    centre = start[:, None] + scale[:, None] * o  # B x size, absolute
    p = torch.arange(in_size, device=start.device, dtype=torch.float32) + 0.5  # in_size
    w = (1.0 - ((p - centre[..., None]) / support).abs()).clamp(min=0.0)  # B x size x in_size
    inside = (p >= start[:, None]) & (p < (start + length)[:, None])  # B x in_size
    w = w * inside[:, None, :]
    return w / w.sum(-1, keepdim=True)


def resized_crop(images: Tensor, boxes: Tensor, size: int, antialias: bool = False) -> Tensor:
    """Crop each sample's box (B x 4: top, left, height, width) and resize it to size x size.

    Equals `F.resized_crop(img, top, left, height, width, [size, size], antialias=...)` per
    sample (bilinear), batched: one `grid_sample` or, with antialias, two batched matmuls.
    """
    b, _, h, w = images.shape
    top, left, ch, cw = boxes.float().unbind(1)  # each B
    if antialias:
        wy = _antialias_weights(top, ch, size, h)  # B x S x H
        wx = _antialias_weights(left, cw, size, w)  # B x S x W
        out = torch.matmul(wy[:, None], images)  # B x 3 x S x W
        return torch.matmul(out, wx.transpose(1, 2)[:, None])  # B x 3 x S x S
    ys = _bilinear_coords(top, ch, size) * (2.0 / max(h - 1, 1)) - 1.0  # B x S, in [-1, 1]
    xs = _bilinear_coords(left, cw, size) * (2.0 / max(w - 1, 1)) - 1.0  # B x S
    grid = torch.stack(
        (xs[:, None, :].expand(b, size, size), ys[:, :, None].expand(b, size, size)), dim=-1
    )  # B x S x S x 2, (x, y)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def hflip(images: Tensor, flip: Tensor) -> Tensor:
    """Mirror the samples where `flip` (B bool) is set."""
    return torch.where(_col(flip), images.flip(-1), images)


def _luma(images: Tensor) -> Tensor:
    r, g, b = images.unbind(1)
    return (r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2]).unsqueeze(1)  # B x 1 x H x W


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = _col(factor)
    return (images * f + other * (1.0 - f)).clamp(0.0, 1.0)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Scale intensities by per-sample `factor` (B), torchvision's definition."""
    return (images * _col(factor)).clamp(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each sample with its mean luma (a flat grey image)."""
    mean = _luma(images).mean(dim=(1, 2, 3), keepdim=True)  # B x 1 x 1 x 1
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each sample with its own grayscale version."""
    return _blend(images, _luma(images), factor)


def _rgb_to_hsv(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision's RGB -> HSV (after Pillow), hue in sixths of the circle, unwrapped."""
    r, g, _ = images.unbind(1)
    minc, maxc = torch.aminmax(images, dim=1)  # B x H x W
    eqc = maxc == minc  # grey pixels: hue and saturation 0, no division by zero
    rng = maxc - minc
    s = rng / torch.where(eqc, 1.0, maxc)
    rc, gc, bc = ((maxc[:, None] - images) / torch.where(eqc, 1.0, rng)[:, None]).unbind(1)
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h6 = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    return torch.where(eqc, 0.0, h6), s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """HSV (each B x H x W, hue in [0, 1)) -> RGB B x 3 x H x W.

    The closed form v * (1 - s * clamp(min(k, 4 - k), 0, 1)), k = (n + 6h) mod 6, n = 5, 3, 1,
    equals torchvision's per-sector selection of (v, p, q, t) without a gather.
    """
    n = _const((5.0, 3.0, 1.0), h.device, h.dtype).view(1, 3, 1, 1)
    k = (n + h[:, None] * 6.0).remainder(6.0)  # B x 3 x H x W
    return v[:, None] * (1.0 - s[:, None] * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Rotate hue by per-sample `factor` (B, fraction of the circle) through HSV, as torchvision;
    samples with factor 0 are returned untouched (the round trip is not exact)."""
    h6, s, v = _rgb_to_hsv(images)
    h = (h6 / 6.0 + factor.view(-1, 1, 1)).remainder(1.0)
    return torch.where(_col(factor == 0), images, _hsv_to_rgb(h, s, v))


def grayscale(images: Tensor, mask: Tensor) -> Tensor:
    """Replace the samples where `mask` (B bool) is set by their 3-channel luma."""
    return torch.where(_col(mask), _luma(images).expand_as(images), images)


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with per-sample `sigma` (B; 0 = none), reflect padding, one
    grouped convolution per axis (torchvision's `gaussian_blur` kernel and padding)."""
    b, c, h, w = images.shape
    d = torch.arange(kernel_size, device=images.device, dtype=torch.float32)
    d = d - (kernel_size - 1) / 2  # k
    k = torch.exp(-0.5 * (d / sigma.clamp(min=1e-6)[:, None]) ** 2)  # B x k
    delta = (d == 0).float().expand_as(k)  # identity kernel
    k = torch.where(sigma[:, None] > 0, k / k.sum(1, keepdim=True), delta)
    k = k.repeat_interleave(c, dim=0)  # (B*C) x k
    pad = kernel_size // 2
    x = F.pad(images.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(b * c, 1, kernel_size, 1), groups=b * c)  # vertical
    x = F.conv2d(x, k.view(b * c, 1, 1, kernel_size), groups=b * c)  # horizontal
    return x.view(b, c, h, w)


def solarize(images: Tensor, mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert pixels >= threshold in the samples where `mask` (B bool) is set."""
    return torch.where(_col(mask) & (images >= threshold), 1.0 - images, images)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Per-channel (x - mean) / std."""
    m = _const(tuple(mean), images.device, images.dtype).view(1, -1, 1, 1)
    s = _const(tuple(std), images.device, images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """`RandomResizedCrop.make_params` for a whole batch: 10 tries per sample, the first valid one
    wins, else torchvision's central fallback crop. Returns B x 4 (top, left, height, width)."""
    dev = generator.device
    u = torch.rand(batch, 10, 2, generator=generator, device=dev)  # area, log-ratio draws
    pos = torch.rand(batch, 2, generator=generator, device=dev)  # top, left draws
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])  # B x 10
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])  # B x 10
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    ok = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)  # B x 10
    first = ok.int().argmax(dim=1, keepdim=True)  # index of the first valid try (0 if none)
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]  # B
    # Fallback: the largest central crop whose aspect ratio is inside `ratio`.
    in_ratio = width / height
    fw, fh = float(width), float(height)
    if in_ratio < min(ratio):
        fh = float(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw = float(round(height * max(ratio)))
    found = ok.any(dim=1)
    cw = torch.where(found, cw, fw)
    ch = torch.where(found, ch, fh)
    top = torch.where(found, torch.floor(pos[:, 0] * (height - ch + 1)), (height - fh) // 2)
    left = torch.where(found, torch.floor(pos[:, 1] * (width - cw + 1)), (width - fw) // 2)
    top = torch.minimum(top, height - ch)  # guard against rand() rounding up to 1
    left = torch.minimum(left, width - cw)
    return torch.stack((top, left, ch, cw), dim=1)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=g.device)


def sample_params(
    recipe: AugmentRecipe, batch: int, height: int, width: int, generator: torch.Generator
) -> ViewParams:
    """Draw one view's per-sample parameters on the generator's device.

    Every draw is made whatever the probabilities and `drop`, in a fixed order, so for a given
    seed an ablation (`drop`) changes only the dropped op: the crops and the rest stay the same.
    """
    r, g, n = recipe, generator, batch
    boxes = sample_crop_boxes(n, height, width, r.crop_scale, r.crop_ratio, g)
    flip = torch.rand(n, generator=g, device=g.device) < r.p_flip
    jitter = torch.rand(n, generator=g, device=g.device) < r.p_jitter
    bright = _uniform(n, max(0.0, 1 - r.brightness), 1 + r.brightness, g)
    contrast = _uniform(n, max(0.0, 1 - r.contrast), 1 + r.contrast, g)
    sat = _uniform(n, max(0.0, 1 - r.saturation), 1 + r.saturation, g)
    hue = _uniform(n, -r.hue, r.hue, g)
    gray = torch.rand(n, generator=g, device=g.device) < r.p_gray
    blur = torch.rand(n, generator=g, device=g.device) < r.p_blur
    sigma = _uniform(n, r.blur_sigma[0], r.blur_sigma[1], g)
    sol = torch.rand(n, generator=g, device=g.device) < r.p_solarize

    if not r.enabled("crop"):
        zero = torch.zeros(n, device=g.device)
        boxes = torch.stack((zero, zero, zero + height, zero + width), dim=1)  # full image
    jitter = jitter & r.enabled("jitter")
    return ViewParams(
        boxes=boxes,
        flip=flip & r.enabled("flip"),
        brightness=torch.where(jitter, bright, 1.0),
        contrast=torch.where(jitter, contrast, 1.0),
        saturation=torch.where(jitter, sat, 1.0),
        hue=torch.where(jitter, hue, 0.0),
        gray=gray & r.enabled("grayscale"),
        blur_sigma=torch.where(blur & r.enabled("blur"), sigma, 0.0),
        solarize=sol & r.enabled("solarize"),
    )


def apply_view(
    images: Tensor,
    recipe: AugmentRecipe,
    params: ViewParams,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> Tensor:
    """Make one view: images B x 3 x H x W (uint8 or float in [0, 1]) -> B x 3 x S x S, normalised.

    Order as in SimCLR/BYOL: crop -> flip -> jitter -> grayscale -> blur -> solarize -> normalise.
    `params` come from `sample_params(recipe, ...)`: blur runs only if the recipe can blur.
    """
    x = resized_crop(to_float(images), params.boxes, recipe.crop_size, recipe.antialias)
    x = hflip(x, params.flip)
    x = adjust_brightness(x, params.brightness)
    x = adjust_contrast(x, params.contrast)
    x = adjust_saturation(x, params.saturation)
    x = adjust_hue(x, params.hue)
    x = grayscale(x, params.gray)
    if recipe.enabled("blur") and recipe.p_blur > 0:  # static check: skip the convolutions
        x = gaussian_blur(x, params.blur_sigma, recipe.blur_kernel_size)
    x = solarize(x, params.solarize, recipe.solarize_threshold)
    x = normalize(x, recipe.mean, recipe.std).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def check_images(images: Tensor) -> None:
    """Refuse what the ops cannot take, with a message that says what to pass instead."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise SeppError(f"augmentation needs a B x 3 x H x W image batch, got {shape}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise SeppError(f"images must be uint8 or float in [0, 1], got {images.dtype}")


class GPUAugment:
    """Makes the views of a `TwoViewRecipe` on the device of the images it is given.

    `seed` seeds one `torch.Generator` per device: the same seed and input give the same views
    (CPU and CUDA generators draw different streams). `seed=None` seeds from system entropy.
    Under DDP give each rank its own seed (e.g. `seed + rank`), or ranks share their draws.
    """

    def __init__(
        self,
        recipe: TwoViewRecipe,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        self.recipe = recipe
        self.seed = seed
        self.dtype = dtype
        self.channels_last = channels_last
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """This augmenter's generator on `device`, made on first use."""
        if device not in self._generators:
            g = torch.Generator(device=device)
            if self.seed is None:
                g.seed()
            else:
                g.manual_seed(self.seed)
            self._generators[device] = g
        return self._generators[device]

    @torch.no_grad()
    def one_view(self, images: Tensor, recipe: AugmentRecipe) -> Tensor:
        """One view of every image: B x 3 x H x W -> B x 3 x S x S."""
        check_images(images)
        b, _, h, w = images.shape
        params = sample_params(recipe, b, h, w, self.generator(images.device))
        return apply_view(images, recipe, params, self.dtype, self.channels_last)

    def __call__(self, images: Tensor) -> list[Tensor]:
        """All views of the recipe: [view1, view2, local crops...], each of the same B images."""
        return [self.one_view(images, r) for r in self.recipe.views]

    def pair_views(self, images_a: Tensor, images_b: Tensor) -> tuple[Tensor, Tensor]:
        """Pair items (semantic positives): view 1 of image A[i] and view 2 of image B[i]."""
        check_images(images_a)
        check_images(images_b)
        if images_a.shape[0] != images_b.shape[0]:
            raise SeppError(
                f"pair batches differ in size ({images_a.shape[0]} vs {images_b.shape[0]}): "
                "pass the anchors and their positives aligned, one positive per anchor"
            )
        return (
            self.one_view(images_a, self.recipe.view1),
            self.one_view(images_b, self.recipe.view2),
        )
