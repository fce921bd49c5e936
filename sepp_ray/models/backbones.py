"""Backbones: any timm model as a pooled-feature extractor, plus project-defined aliases.

timm's own `create_model` is the registry for architectures; this module adds the one change SSL
on small images needs (a CIFAR stem, as in SimCLR arXiv 2002.05709 appendix B.9) and a small alias
registry in the style of timm's `register_model`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import timm
import timm.models
from torch import nn

from sepp_ray.errors import SeppError
from sepp_ray.registry import Registry

BackboneFactory = Callable[..., tuple[nn.Module, int]]

# Aliases: `fn(cifar_stem, pretrained, **timm_kwargs) -> (module, feat_dim)` by name
# (`@BACKBONES.register("resnet18_cifar")`); every timm model name is accepted besides them.
BACKBONES: Registry[BackboneFactory] = Registry("backbone alias")

# timm modules whose models take the CIFAR stem surgery (see `_cifar_resnet_stem`).
_RESNET_MODULES = ["resnet"]
# timm modules whose models accept `img_size` / `patch_size` keywords.
_VIT_MODULES = ["vision_transformer", "deit"]


def list_backbones() -> list[str]:
    """Project-defined aliases; every timm name (`timm.list_models()`) works too."""
    return BACKBONES.names()


def check_backbone(name: str, cifar_stem: bool = False) -> None:
    """SeppError unless `name` is a registered alias or a timm model name (and, with
    ``cifar_stem``, of a family the CIFAR stem adapts): what configs call before any work, so
    a typo fails in seconds rather than inside every training worker."""
    if name in BACKBONES:
        return
    if isinstance(name, str) and timm.models.is_model(name):
        if cifar_stem:
            _check_cifar_stem(name)
        return
    close = difflib.get_close_matches(str(name), [*BACKBONES, *timm.list_models()], n=5)
    hint = f"did you mean one of {close}? " if close else ""
    raise SeppError(
        f"unknown backbone {name!r}: {hint}use a timm model name (list them with "
        f"`python -c \"import timm; print(timm.list_models('resnet*'))\"`) "
        f"or one of the aliases {list_backbones()}"
    )


def _check_cifar_stem(name: str) -> None:
    """The CIFAR stem adapts timm ResNets (3x3/1 first conv, no max-pool) and ViTs (32 px,
    4 px patches); any other family is refused rather than trained at the wrong scale."""
    if not timm.models.is_model_in_modules(name, (*_RESNET_MODULES, *_VIT_MODULES)):
        raise SeppError(
            f"cifar_stem is unsupported for backbone {name!r}: it supports timm ResNets and "
            f"ViTs; pass cifar_stem=False (and larger images) for this family"
        )


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled features a timm model with `num_classes=0` returns."""
    # head_hidden_size differs from num_features where a pre-logits layer sits after pooling
    # (MobileNetV3, some ViTs); it is absent on older model classes.
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not isinstance(dim, int):
        raise SeppError(f"cannot tell the feature width of {type(model).__name__}")
    return dim


def _cifar_resnet_stem(model: nn.Module) -> None:
    """Swap the 7x7/2 conv and the max-pool for a 3x3/1 conv: 32 px inputs keep 32x32 maps."""
    conv1 = model.conv1
    if isinstance(conv1, nn.Conv2d):
        model.conv1 = nn.Conv2d(
            conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
    elif isinstance(conv1, nn.Sequential) and isinstance(conv1[0], nn.Conv2d):
        # deep stem (resnet*d, test_resnet): three 3x3 convs, only the first strides
        conv1[0].stride = (1, 1)
    else:
        raise SeppError(f"cifar_stem: unexpected ResNet stem {type(conv1).__name__}")
    model.maxpool = nn.Identity()


def create_backbone(
    name: str, cifar_stem: bool = False, pretrained: bool = False, **timm_kwargs: Any
) -> tuple[nn.Module, int]:
    """Build a feature extractor (global-pooled features, no classifier) and its feature width.

    `name` is a registered alias or any timm model name. `cifar_stem=True` adapts the network to
    32 px images: ResNets get a 3x3 stride-1 first conv and no max-pool (the pretrained first
    conv, if any, is dropped); ViTs get `img_size=32, patch_size=4` unless given in `timm_kwargs`.
    """
    if name in BACKBONES:
        return BACKBONES.get(name)(cifar_stem=cifar_stem, pretrained=pretrained, **timm_kwargs)
    check_backbone(name, cifar_stem)
    is_resnet = timm.models.is_model_in_modules(name, _RESNET_MODULES)
    if cifar_stem and timm.models.is_model_in_modules(name, _VIT_MODULES):
        timm_kwargs.setdefault("img_size", 32)
        timm_kwargs.setdefault("patch_size", 4)
    model = timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
    if cifar_stem and is_resnet:
        _cifar_resnet_stem(model)
    return model, feature_dim(model)


@BACKBONES.register("resnet18_cifar")
def resnet18_cifar(
    cifar_stem: bool = True, pretrained: bool = False, **timm_kwargs: Any
) -> tuple[nn.Module, int]:
    """ResNet-18 with the CIFAR stem always on: the standard 32 px SSL baseline."""
    return create_backbone("resnet18", cifar_stem=True, pretrained=pretrained, **timm_kwargs)


@BACKBONES.register("resnet50_cifar")
def resnet50_cifar(
    cifar_stem: bool = True, pretrained: bool = False, **timm_kwargs: Any
) -> tuple[nn.Module, int]:
    """ResNet-50 with the CIFAR stem always on."""
    return create_backbone("resnet50", cifar_stem=True, pretrained=pretrained, **timm_kwargs)
