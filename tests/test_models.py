"""Backbones (timm + CIFAR stem) and heads: shapes, feature widths, errors, weight norm."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from sepp_ray.errors import SeppError
from sepp_ray.models import (
    DINOHead,
    create_backbone,
    list_backbones,
    prediction_mlp,
    projection_mlp,
)
from sepp_ray.models import backbones as backbones_mod
from sepp_ray.registry import Registry


def _stem(model: Any, x: torch.Tensor) -> torch.Tensor:
    return model.maxpool(model.act1(model.bn1(model.conv1(x))))


def test_resnet18_cifar_stem_keeps_32px() -> None:
    model, dim = create_backbone("resnet18", cifar_stem=True)
    assert dim == 512
    conv = model.conv1
    assert isinstance(conv, nn.Conv2d)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    assert _stem(model, x).shape == (2, 64, 32, 32)
    assert model(x).shape == (2, 512)


def test_resnet18_default_stem_is_imagenet() -> None:
    model: Any
    model, dim = create_backbone("resnet18")
    assert dim == 512
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert _stem(model, torch.randn(1, 3, 32, 32)).shape[-2:] == (8, 8)


def test_deep_stem_resnet_cifar() -> None:
    # test_resnet has a deep (3-conv) stem like resnet*d
    model: Any
    model, _ = create_backbone("test_resnet", cifar_stem=True)
    assert model.conv1[0].stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert _stem(model, torch.randn(1, 3, 32, 32)).shape[-2:] == (32, 32)


def test_resnet50_feature_dim() -> None:
    model, dim = create_backbone("resnet50", cifar_stem=True)
    assert dim == 2048
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 2048)


def test_vit_cifar_stem_forward_32px() -> None:
    model: Any
    model, dim = create_backbone("vit_small_patch16_224", cifar_stem=True)
    assert dim == 384
    assert tuple(model.patch_embed.patch_size) == (4, 4)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 384)


def test_alias_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "resnet18_cifar" in list_backbones()
    model, dim = create_backbone("resnet18_cifar")
    assert dim == 512 and isinstance(model.maxpool, nn.Identity)

    fresh: Registry[backbones_mod.BackboneFactory] = Registry("backbone alias")
    monkeypatch.setattr(backbones_mod, "BACKBONES", fresh)

    @fresh.register("_test_tiny")
    def _tiny(cifar_stem: bool = False, pretrained: bool = False) -> tuple[nn.Module, int]:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(7)), 7

    assert "_test_tiny" in list_backbones()
    assert create_backbone("_test_tiny")[1] == 7
    with pytest.raises(ValueError, match="already registered"):
        fresh.register("_test_tiny")(_tiny)


def test_unknown_backbone_error() -> None:
    with pytest.raises(SeppError, match=r"timm\.list_models"):
        create_backbone("resnet_does_not_exist")


def test_cifar_stem_unsupported_family() -> None:
    with pytest.raises(SeppError, match="cifar_stem is unsupported"):
        create_backbone("test_convnext", cifar_stem=True)
    # without the stem the same family works
    assert create_backbone("test_convnext")[1] > 0


@pytest.mark.parametrize(
    ("num_layers", "batch_norm", "last_bn", "n_linear", "n_bn"),
    [
        (1, True, False, 1, 0),
        (2, True, False, 2, 1),
        (3, True, True, 3, 3),
        (3, False, False, 3, 0),
    ],
)
def test_projection_mlp(
    num_layers: int, batch_norm: bool, last_bn: bool, n_linear: int, n_bn: int
) -> None:
    head = projection_mlp(16, 32, 8, num_layers, batch_norm=batch_norm, last_bn=last_bn)
    kinds = [type(m) for m in head]
    assert kinds.count(nn.Linear) == n_linear
    assert kinds.count(nn.BatchNorm1d) == n_bn
    assert kinds.count(nn.ReLU) == num_layers - 1
    assert head(torch.randn(4, 16)).shape == (4, 8)


def test_prediction_mlp_shape() -> None:
    head = prediction_mlp(8, 32, 8)
    assert head(torch.randn(4, 8)).shape == (4, 8)
    assert not isinstance(head[-1], nn.BatchNorm1d)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_weight_norm(norm_last_layer: bool) -> None:
    head = DINOHead(
        16, out_dim=40, hidden_dim=32, bottleneck_dim=8, norm_last_layer=norm_last_layer
    )
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 40)
    gain = head.last_layer.parametrizations.weight.original0
    direction = head.last_layer.parametrizations.weight.original1
    assert gain.requires_grad is not norm_last_layer
    out.sum().backward()
    assert direction.grad is not None and direction.grad.abs().sum() > 0
    # logits are bounded by the unit-norm prototypes and the normalised bottleneck
    assert out.abs().max() <= 1.0 + 1e-5
    with torch.no_grad():
        direction.mul_(torch.rand(40, 1) * 10 + 0.1)  # rescale rows: weight norm undoes it
    row_norms = head.last_layer.weight.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.ones(40))
