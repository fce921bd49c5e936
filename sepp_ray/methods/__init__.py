"""SSL methods, one file each, behind a registry: `create_method("simclr", backbone="resnet18")`."""

from __future__ import annotations

import dataclasses
from typing import Any

from sepp_ray.errors import SeppError
from sepp_ray.methods import (  # noqa: F401  (importing registers each method)
    barlow_twins,
    byol,
    dino,
    moco,
    nnclr,
    simclr,
    simsiam,
    supcon,
    vicreg,
)
from sepp_ray.methods.base import METHODS, PAIR_USES, Method, check_pair_use
from sepp_ray.methods.scale import DataScale, scale_hparams
from sepp_ray.models.backbones import create_backbone


def list_methods() -> list[str]:
    """Names `create_method` accepts."""
    return METHODS.names()


def method_class(name: str) -> type[Method]:
    """The registered class; SeppError naming the choices for an unknown name."""
    return METHODS.get(name)


def method_hparams(name: str) -> type:
    """The hyperparameter dataclass of method `name` (its fields are the valid overrides)."""
    return method_class(name).hparams_cls


def make_hparams(name: str, **overrides: Any) -> Any:
    """The method's hyperparameters with `overrides` applied; SeppError on an unknown field."""
    cls = method_hparams(name)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise SeppError(
            f"unknown hyperparameter(s) {unknown} for method {name!r}: valid ones are {valid}"
        )
    try:
        return cls(**overrides)
    except (TypeError, ValueError) as e:
        raise SeppError(f"bad hyperparameters for method {name!r}: {e}") from e


def fit_hparams(
    name: str, overrides: dict[str, Any], n_items: int, scale: DataScale | None = None
) -> dict[str, Any]:
    """`overrides` plus whatever method `name` changes to fit a dataset of `n_items` training
    items per epoch (MoCo's queue and NNCLR's support set never exceed it): what to pass to
    `create_method`, and to record in a run's manifest. Pass the plain run's items (the
    split's images), so every arm of a comparison gets the same sizes. ``scale``: the data's
    scale, whose recipe (`scale_hparams`) fills what ``overrides`` leaves unset."""
    hp = make_hparams(name, **overrides)
    recipe = scale_hparams(name, scale) if scale is not None else {}
    fitted = method_class(name).fit_hparams(make_hparams(name, **{**recipe, **overrides}), n_items)
    changed = {
        f.name: getattr(fitted, f.name)
        for f in dataclasses.fields(fitted)
        if getattr(fitted, f.name) != getattr(hp, f.name)
    }
    return {**overrides, **changed}


def create_method(
    name: str,
    backbone: str = "resnet18",
    cifar_stem: bool = False,
    pretrained: bool = False,
    **hparam_overrides: Any,
) -> Method:
    """Build method `name` on a fresh backbone (any timm name or a registered alias)."""
    cls = method_class(name)
    hp = make_hparams(name, **hparam_overrides)
    net, feat_dim = create_backbone(backbone, cifar_stem=cifar_stem, pretrained=pretrained)
    return cls(net, feat_dim, hp)


__all__ = [
    "METHODS",
    "PAIR_USES",
    "Method",
    "check_pair_use",
    "create_method",
    "fit_hparams",
    "list_methods",
    "make_hparams",
    "method_class",
    "method_hparams",
]
