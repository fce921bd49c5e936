"""Typed augmentation recipes and the named recipes of the SSL papers.

A recipe is plain data (frozen dataclasses); `sepp_ray.data.augment` turns it into views on the
training device. Recipes are per view because BYOL-style methods blur and solarize their two views
differently, and DINO adds small local crops (multi-crop).

Interpolation is always bilinear (the papers use bicubic for BYOL/DINO/VICReg/Barlow Twins on
PIL images); see `sepp_ray.data.augment.resized_crop` for the resampling details.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sepp_ray.errors import SeppError
from sepp_ray.registry import Registry

# Op names the `drop` switch understands (the transformation ablation of arXiv 2510.08722).
OPS: frozenset[str] = frozenset({"crop", "flip", "jitter", "grayscale", "blur", "solarize"})

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Below this image size the named recipes do not blur: the CIFAR setups of the papers (and
# solo-learn's CIFAR configs) leave it out, a 3-pixel blur of a 32 px image erases most content.
BLUR_MIN_SIZE = 96


def check_drop(drop: Iterable[str]) -> frozenset[str]:
    """Validate op names for the `drop` switch; a typo must not silently ablate nothing."""
    if isinstance(drop, str):
        drop = (drop,)
    ops = frozenset(drop)
    unknown = ops - OPS
    if unknown:
        raise SeppError(
            f"unknown augmentation op(s) to drop: {sorted(unknown)}; choose from {sorted(OPS)}"
        )
    return ops


def _check_range(name: str, lo_hi: tuple[float, float], lo: float, hi: float) -> None:
    if len(lo_hi) != 2 or not (lo <= lo_hi[0] <= lo_hi[1] <= hi):
        raise SeppError(f"{name} must be (low, high) with {lo} <= low <= high <= {hi}, got {lo_hi}")


@dataclass(frozen=True)
class AugmentRecipe:
    """How one view is made: crop -> flip -> jitter -> grayscale -> blur -> solarize -> normalise.

    Each `p_*` is the per-sample probability of its op. Jitter strengths follow torchvision's
    `ColorJitter`: factors uniform in [max(0, 1 - s), 1 + s] and hue shift uniform in [-hue, hue].
    `drop` removes ops entirely (an ablation switch); dropping "crop" resizes the whole image.
    """

    crop_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    p_flip: float = 0.5
    p_jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p_gray: float = 0.2
    p_blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    p_solarize: float = 0.0
    solarize_threshold: float = 0.5
    antialias: bool = False  # True: torchvision/PIL-like antialiased downscaling (slower)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    drop: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop", check_drop(self.drop))
        if not isinstance(self.crop_size, int) or self.crop_size < 2:
            raise SeppError(f"crop_size must be an int >= 2, got {self.crop_size!r}")
        _check_range("crop_scale", self.crop_scale, 1e-6, 1.0)
        _check_range("crop_ratio", self.crop_ratio, 1e-6, math.inf)
        for name in ("p_flip", "p_jitter", "p_gray", "p_blur", "p_solarize"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise SeppError(f"{name} must be a probability in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise SeppError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise SeppError(
                f"hue must be in [0, 0.5] (a fraction of the hue circle), got {self.hue}"
            )
        _check_range("blur_sigma", self.blur_sigma, 1e-6, math.inf)
        if not 0.0 <= self.solarize_threshold <= 1.0:
            raise SeppError(f"solarize_threshold must be in [0, 1], got {self.solarize_threshold}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise SeppError(f"mean and std need 3 values, std > 0; got {self.mean}, {self.std}")

    @property
    def blur_kernel_size(self) -> int:
        """About 10% of the view's side, odd, at least 3 (SimCLR, arXiv 2002.05709: 23 at 224)."""
        k = int(0.1 * self.crop_size)
        return max(3, k if k % 2 else k + 1)

    def enabled(self, op: str) -> bool:
        """False when `op` is dropped (the op names of `OPS`)."""
        return op not in self.drop


@dataclass(frozen=True)
class TwoViewRecipe:
    """Two (possibly different) views, plus optional multi-crop local views (DINO).

    The augmenter returns views in the order `[view1, view2, local x n_local]`.
    """

    view1: AugmentRecipe
    view2: AugmentRecipe
    n_local: int = 0
    local: AugmentRecipe | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.n_local < 0:
            raise SeppError(f"n_local must be >= 0, got {self.n_local}")
        if self.n_local > 0 and self.local is None:
            raise SeppError("n_local > 0 needs a `local` recipe for the small crops")

    @property
    def views(self) -> list[AugmentRecipe]:
        """Recipes in output order."""
        local = [self.local] * self.n_local if self.local is not None else []
        return [self.view1, self.view2, *local]

    def replace_views(self, **changes: Any) -> TwoViewRecipe:
        """Change fields of every view recipe at once (e.g. `mean`/`std` for a dataset)."""
        local = dataclasses.replace(self.local, **changes) if self.local is not None else None
        return dataclasses.replace(
            self,
            view1=dataclasses.replace(self.view1, **changes),
            view2=dataclasses.replace(self.view2, **changes),
            local=local,
        )

    def with_drop(self, drop: Iterable[str]) -> TwoViewRecipe:
        """The same recipe with `drop` ops removed from every view."""
        return self.replace_views(drop=check_drop(drop))


# Named two-view recipes: `fn(image_size) -> TwoViewRecipe`; a method names its own default.
RECIPES: Registry[Callable[[int], TwoViewRecipe]] = Registry("augmentation recipe")


def _blur(p: float, image_size: int) -> float:
    return p if image_size >= BLUR_MIN_SIZE else 0.0


@RECIPES.register("simclr")
def simclr(image_size: int) -> TwoViewRecipe:
    """SimCLR, arXiv 2002.05709 (App. A): crop 0.08-1, flip, jitter p=0.8, gray p=0.2, blur p=0.5.

    Jitter strength s=0.5 (0.4/0.4/0.4/0.1), the paper's CIFAR strength and the common choice;
    the paper's ImageNet runs use s=1 (0.8/0.8/0.8/0.2).
    """
    v = AugmentRecipe(image_size, p_blur=_blur(0.5, image_size))
    return TwoViewRecipe(v, v, name="simclr")


@RECIPES.register("mocov2")
def mocov2(image_size: int) -> TwoViewRecipe:
    """MoCo v2, arXiv 2003.04297: SimCLR's recipe with crop scale 0.2-1 and blur p=0.5."""
    v = AugmentRecipe(image_size, crop_scale=(0.2, 1.0), p_blur=_blur(0.5, image_size))
    return TwoViewRecipe(v, v, name="mocov2")


@RECIPES.register("simsiam")
def simsiam(image_size: int) -> TwoViewRecipe:
    """SimSiam, arXiv 2011.10566: MoCo v2's recipe (crop 0.2-1, jitter 0.4/0.4/0.4/0.1 p=0.8)."""
    v = AugmentRecipe(image_size, crop_scale=(0.2, 1.0), p_blur=_blur(0.5, image_size))
    return TwoViewRecipe(v, v, name="simsiam")


def _byol_views(image_size: int, scale: tuple[float, float]) -> tuple[AugmentRecipe, AugmentRecipe]:
    base = AugmentRecipe(image_size, crop_scale=scale, saturation=0.2)
    v1 = dataclasses.replace(base, p_blur=_blur(1.0, image_size), p_solarize=0.0)
    v2 = dataclasses.replace(base, p_blur=_blur(0.1, image_size), p_solarize=0.2)
    return v1, v2


@RECIPES.register("byol")
def byol(image_size: int) -> TwoViewRecipe:
    """BYOL, arXiv 2006.07733 (Table 6): jitter 0.4/0.4/0.2/0.1 p=0.8, gray p=0.2, asymmetric
    blur (1.0 / 0.1) and solarize (0.0 / 0.2)."""
    return TwoViewRecipe(*_byol_views(image_size, (0.08, 1.0)), name="byol")


@RECIPES.register("vicreg")
def vicreg(image_size: int) -> TwoViewRecipe:
    """VICReg, arXiv 2105.04906 (App. C.1 and its official code): BYOL's asymmetric recipe."""
    return TwoViewRecipe(*_byol_views(image_size, (0.08, 1.0)), name="vicreg")


@RECIPES.register("barlow_twins")
def barlow_twins(image_size: int) -> TwoViewRecipe:
    """Barlow Twins, arXiv 2103.03230 (Sec. 4): BYOL's asymmetric recipe."""
    return TwoViewRecipe(*_byol_views(image_size, (0.08, 1.0)), name="barlow_twins")


@RECIPES.register("dino")
def dino(image_size: int) -> TwoViewRecipe:
    """DINO, arXiv 2104.14294: BYOL-style global crops at scale 0.4-1 plus 8 local crops at
    scale 0.05-0.4 and 96/224 of the global size, blurred with p=0.5."""
    v1, v2 = _byol_views(image_size, (0.4, 1.0))
    local_size = max(8, round(image_size * 96 / 224))
    local = AugmentRecipe(
        local_size, crop_scale=(0.05, 0.4), saturation=0.2, p_blur=_blur(0.5, image_size)
    )
    return TwoViewRecipe(v1, v2, n_local=8, local=local, name="dino")


def get_recipe(name: str, image_size: int, drop: Iterable[str] = ()) -> TwoViewRecipe:
    """The named recipe for square views of `image_size` px, with `drop` ops removed."""
    recipe = RECIPES.get(name)(image_size)
    drop = check_drop(drop)
    return recipe.with_drop(drop) if drop else recipe
