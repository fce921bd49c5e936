"""Each SSL method's optimiser recipe, as its paper trained it, and the one place where a run's
overrides are applied to it (`resolve_optim`).

One recipe for every method was wrong for most of them: MoCo-v2 and SimSiam train with plain
SGD, SimSiam keeps its predictor at a fixed rate, DINO uses AdamW with a weight-decay schedule
and gradient clipping. Learning rates are given at batch 256 and scaled to the run's batch by
`lr_scaling` ("linear": lr = base_lr x B / 256, the rule of every paper below).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn
from torch.optim import Optimizer

from sepp_ray.errors import SeppError
from sepp_ray.train.optim import LR_RULES, OPTIMIZERS, build_optimizer, scaled_lr

# PretrainConfig fields that override a recipe; None there means "the method's default"
OVERRIDES = (
    "optimizer",
    "base_lr",
    "lr_scaling",
    "final_lr",
    "weight_decay",
    "weight_decay_end",
    "warmup_epochs",
    "grad_clip",
)


@dataclass(frozen=True)
class OptimRecipe:
    """How a method is optimised.

    optimizer: lars | sgd | adamw. base_lr: peak rate at batch 256, scaled by lr_scaling.
    weight_decay / weight_decay_end: decay of weights (never of biases and norm layers when
    exclude_bias_norm); with an end value it follows a cosine from the first to the second.
    momentum (LARS, SGD) and betas (AdamW). warmup_epochs: linear warm-up, then a cosine to
    final_lr (absolute) or else final_lr_ratio x the peak. grad_clip: max global gradient norm
    (None: no clip). exclude_bias_norm: biases and norm layers get no weight decay and no LARS
    trust ratio. bias_lr_scale: their rate relative to the weights'. fixed_lr_modules: submodules
    of the method held at the peak rate, never warmed up nor decayed. source: where it comes from.
    """

    optimizer: str
    base_lr: float
    lr_scaling: str = "linear"
    weight_decay: float = 0.0
    weight_decay_end: float | None = None
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: int = 10
    grad_clip: float | None = None
    final_lr: float | None = None
    final_lr_ratio: float = 0.0
    exclude_bias_norm: bool = True
    bias_lr_scale: float = 1.0
    fixed_lr_modules: tuple[str, ...] = field(default_factory=tuple)
    source: str = ""

    def peak_lr(self, global_batch: int) -> float:
        """The warm-up's target rate for `global_batch` images per step."""
        return scaled_lr(self.base_lr, global_batch, rule=self.lr_scaling)

    def end_lr(self, peak: float) -> float:
        """The rate the cosine ends at, for a run whose peak rate is `peak`."""
        return self.final_lr if self.final_lr is not None else self.final_lr_ratio * peak

    def warmup_steps(self, steps_per_epoch: int, epochs: int) -> int:
        """Warm-up steps, kept below the run's length so a short run still decays."""
        return steps_per_epoch * max(0, min(self.warmup_epochs, epochs - 1))

    def build(self, model: nn.Module, peak_lr: float) -> Optimizer:
        """This recipe's optimiser over `model` (the Method, or a wrapper around it)."""
        return build_optimizer(
            self.optimizer,
            model,
            peak_lr,
            self.weight_decay,
            momentum=self.momentum,
            betas=self.betas,
            exclude_bias_norm=self.exclude_bias_norm,
            bias_lr_scale=self.bias_lr_scale,
            fixed_lr_modules=self.fixed_lr_modules,
            weight_decay_end=self.weight_decay_end,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, for a run's manifest."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["fixed_lr_modules"] = list(self.fixed_lr_modules)
        return d


_SIMCLR = OptimRecipe(
    # SimCLR (arXiv 2002.05709, sec. 2.2 and B.1): LARS, lr 0.3 x B/256 (4.8 at 4096), weight
    # decay 1e-6, 10 warm-up epochs then cosine without restarts; biases and BN excluded from
    # LARS adaptation and decay. Its CIFAR runs (B.9) use the same optimiser; B.1 notes that
    # square-root scaling (0.075 x sqrt(B)) is better at small batch (lr_scaling=sqrt).
    "lars",
    0.3,
    weight_decay=1e-6,
    source="SimCLR arXiv 2002.05709 sec. 2.2, appendix B.1",
)

METHOD_RECIPES: dict[str, OptimRecipe] = {
    "simclr": _SIMCLR,
    # MoCo-v2 (arXiv 2003.04297, sec. 3 and MoCo arXiv 1911.05722 sec. 4): SGD momentum 0.9,
    # lr 0.03 at batch 256, weight decay 1e-4 on every parameter (the reference code decays
    # model.parameters()), cosine schedule, no warm-up.
    "mocov2": OptimRecipe(
        "sgd",
        0.03,
        weight_decay=1e-4,
        warmup_epochs=0,
        exclude_bias_norm=False,
        source="MoCo-v2 arXiv 2003.04297 sec. 3; MoCo arXiv 1911.05722 sec. 4",
    ),
    # SimSiam (arXiv 2011.10566, sec. 4.2 "Optimizer"): SGD momentum 0.9, lr 0.05 x B/256,
    # weight decay 1e-4 on every parameter, cosine decay, no warm-up at batch 512; the
    # predictor's rate is fixed (not decayed), which the paper finds better (sec. 4.2, table 1
    # "pred. lr fixed").
    "simsiam": OptimRecipe(
        "sgd",
        0.05,
        weight_decay=1e-4,
        warmup_epochs=0,
        exclude_bias_norm=False,
        fixed_lr_modules=("predictor",),
        source="SimSiam arXiv 2011.10566 sec. 4.2",
    ),
    # BYOL (arXiv 2006.07733, appendix C "Optimization"): LARS, lr 0.2 x B/256, weight decay
    # 1.5e-6, biases and BN excluded from LARS adaptation and decay, 10 warm-up epochs, cosine
    # to 0.
    "byol": OptimRecipe(
        "lars",
        0.2,
        weight_decay=1.5e-6,
        source="BYOL arXiv 2006.07733 sec. 3.3, appendix C",
    ),
    # Barlow Twins (arXiv 2103.03230, sec. 4 "Implementation details"): LARS, lr 0.2 for the
    # weights and 0.0048 for biases and BN (at B/256 scaling, B = 2048), weight decay 1.5e-6,
    # 10 warm-up epochs, cosine decay by a factor of 1000; biases and BN excluded from LARS
    # adaptation and decay.
    "barlow_twins": OptimRecipe(
        "lars",
        0.2,
        weight_decay=1.5e-6,
        final_lr_ratio=0.001,
        bias_lr_scale=0.0048 / 0.2,
        source="Barlow Twins arXiv 2103.03230 sec. 4",
    ),
    # VICReg (arXiv 2105.04906, appendix C.1): LARS, base lr 0.2 x B/256, weight decay 1e-6,
    # 10 warm-up epochs, cosine decay to 0.001 x the peak (the reference code's end_lr), biases
    # and norm layers excluded.
    "vicreg": OptimRecipe(
        "lars",
        0.2,
        weight_decay=1e-6,
        final_lr_ratio=0.001,
        source="VICReg arXiv 2105.04906 appendix C.1",
    ),
    # DINO (arXiv 2104.14294, sec. 4.1 and appendix): AdamW, lr 5e-4 x B/256 after 10 linear
    # warm-up epochs, cosine to 1e-6, weight decay cosine from 0.04 to 0.4, biases and norm
    # layers not decayed, gradient clip 3.0. That is the ViT recipe the paper reports; a ResNet
    # backbone gets `DINO_RESNET` (`BACKBONE_RECIPES`). The reference clips each tensor's
    # norm; here clipping is on the global norm.
    "dino": OptimRecipe(
        "adamw",
        5e-4,
        weight_decay=0.04,
        weight_decay_end=0.4,
        grad_clip=3.0,
        final_lr=1e-6,
        source="DINO arXiv 2104.14294 sec. 4.1, appendix",
    ),
    # NNCLR (arXiv 2104.14548, sec. 4 "Implementation details") trains as SimCLR does: LARS,
    # base lr 0.3 x B/256, weight decay 1e-6, 10 warm-up epochs, cosine.
    "nnclr": replace(_SIMCLR, source="NNCLR arXiv 2104.14548 sec. 4 (SimCLR's optimiser)"),
    # SupCon (arXiv 2004.11362, sec. 4) trains with LARS at large batch and a cosine schedule;
    # as the labelled ceiling of the SimCLR arms it keeps SimCLR's recipe, so the two differ
    # only in their positives.
    "supcon": replace(_SIMCLR, source="SupCon arXiv 2004.11362 sec. 4; SimCLR's recipe"),
}


# DINO's ResNet-50 recipe (arXiv 2104.14294 table 2 reports its RN50; the settings are the
# authors' ResNet-50 command in facebookresearch/dino's README): SGD momentum 0.9,
# lr 0.03 x B/256, constant weight decay 1e-4, 10 warm-up epochs, cosine to 1e-6, gradient
# clip 3.0 (main_dino.py's default). The README's crop scales (global 0.14-1, local
# 0.05-0.14) belong to the augmentation recipe, not here.
DINO_RESNET = OptimRecipe(
    "sgd",
    0.03,
    weight_decay=1e-4,
    grad_clip=3.0,
    final_lr=1e-6,
    source="DINO arXiv 2104.14294; the ResNet-50 command of facebookresearch/dino's README",
)
# (method, backbone family) -> a recipe that replaces the method's own; the family is a
# substring of the backbone's name ("resnet": resnet18, resnet50, resnet18_cifar, ...)
BACKBONE_RECIPES: dict[tuple[str, str], OptimRecipe] = {("dino", "resnet"): DINO_RESNET}


def method_recipe(method: str, backbone: str = "") -> OptimRecipe:
    """The paper's recipe of `method` (on `backbone` when the paper has one for its family,
    `BACKBONE_RECIPES`); SeppError naming the choices for an unknown method."""
    for (name, family), recipe in BACKBONE_RECIPES.items():
        if name == method and family in backbone.lower():
            return recipe
    if method not in METHOD_RECIPES:
        from sepp_ray.methods import list_methods

        if method in list_methods():
            raise SeppError(
                f"method {method!r} has no optimizer recipe: add one to "
                "sepp_ray.train.optim_defaults.METHOD_RECIPES"
            )
        raise SeppError(f"unknown method {method!r}: choose one of {list_methods()}")
    return METHOD_RECIPES[method]


def resolve_optim(
    method: str, overrides: Mapping[str, Any] | None = None, backbone: str = ""
) -> OptimRecipe:
    """`method`'s recipe on `backbone` with each override that is not None applied (keys:
    `OVERRIDES`).

    An explicit weight_decay without weight_decay_end is constant (it replaces a schedule);
    grad_clip=0 turns the method's clipping off. SeppError for an unknown key or a bad value.
    """
    recipe = method_recipe(method, backbone)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OVERRIDES))
    if unknown:
        raise SeppError(f"unknown optimizer setting(s) {unknown}: valid ones are {list(OVERRIDES)}")
    if "weight_decay" in given and "weight_decay_end" not in given:
        given["weight_decay_end"] = None
    if given.get("grad_clip") == 0:
        given["grad_clip"] = None
    recipe = replace(recipe, **given)
    _check(recipe)
    return recipe


def config_recipe(config: Mapping[str, Any]) -> OptimRecipe:
    """The recipe of a pretraining config given as a mapping (a PretrainConfig's fields): its
    `method` on its `backbone` with its `OVERRIDES` applied."""
    overrides = {k: config.get(k) for k in OVERRIDES}
    return resolve_optim(config["method"], overrides, str(config.get("backbone") or ""))


def _check(r: OptimRecipe) -> None:
    if r.optimizer not in OPTIMIZERS:
        raise SeppError(f"optimizer must be one of {list(OPTIMIZERS)}, got {r.optimizer!r}")
    if r.lr_scaling not in LR_RULES:
        raise SeppError(f"lr_scaling must be one of {list(LR_RULES)}, got {r.lr_scaling!r}")
    if not r.base_lr > 0:
        raise SeppError(f"base_lr must be > 0, got {r.base_lr}")
    for name in ("weight_decay", "weight_decay_end", "final_lr", "warmup_epochs", "grad_clip"):
        value = getattr(r, name)
        if value is not None and value < 0:
            raise SeppError(f"{name} must be >= 0, got {value}")


def recipe_table() -> list[dict[str, Any]]:
    """One row per method: the defaults as the README shows them."""
    rows = [{"method": m, **METHOD_RECIPES[m].to_dict()} for m in sorted(METHOD_RECIPES)]
    rows += [
        {"method": f"{m} ({family})", **r.to_dict()}
        for (m, family), r in sorted(BACKBONE_RECIPES.items())
    ]
    return rows
