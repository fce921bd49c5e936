"""One registry pattern for every pluggable kind: the `Registry` class, then each registry in the
package (methods, backbone aliases, search backends, recipes, source formats, eval protocols):
every name resolves to an entry of its kind, a second registration is refused, an unknown name
is a SeppError that lists the choices."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
from torch import nn

from sepp_ray.data.recipes import RECIPES, TwoViewRecipe
from sepp_ray.data.sources import FORMATS, SOURCES, SourceOptions
from sepp_ray.errors import SeppError
from sepp_ray.eval.command import EvalConfig
from sepp_ray.eval.protocols import PROTOCOLS, Protocol
from sepp_ray.methods import METHODS, Method, list_methods, method_class
from sepp_ray.mining.search import SEARCH_BACKENDS, KeySearcher, available_backends
from sepp_ray.models.backbones import BACKBONES, check_backbone, create_backbone
from sepp_ray.registry import Registry


def test_registry_adds_gets_and_lists_sorted() -> None:
    reg: Registry[int] = Registry("colour")
    reg.add("red", 1)

    @reg.register("blue")
    def _blue() -> int:
        return 2

    assert reg.get("red") == 1 and reg.get("blue") is _blue
    assert reg.names() == ["blue", "red"] == list(reg)
    assert "red" in reg and "green" not in reg and len(reg) == 2
    reg.check("red")


def test_registry_refuses_duplicates_and_bad_names() -> None:
    reg: Registry[int] = Registry("colour")
    reg.add("red", 1)
    with pytest.raises(ValueError, match="colour 'red' is already registered"):
        reg.add("red", 2)
    with pytest.raises(ValueError, match="non-empty string name"):
        reg.add("", 3)
    assert reg.get("red") == 1 and len(reg) == 1


def test_registry_unknown_name_lists_choices() -> None:
    reg: Registry[int] = Registry("colour")
    reg.add("red", 1)
    reg.add("blue", 2)
    with pytest.raises(SeppError, match=r"unknown colour 'green': choose one of \['blue', 'red'\]"):
        reg.get("green")
    with pytest.raises(SeppError, match="unknown colour"):
        reg.check("green")


def test_registry_on_add_runs_before_storing() -> None:
    seen: list[tuple[str, int]] = []

    def positive(name: str, entry: int) -> None:
        if entry <= 0:
            raise TypeError(f"{name} must be positive")
        seen.append((name, entry))

    reg: Registry[int] = Registry("count", on_add=positive)
    reg.add("one", 1)
    with pytest.raises(TypeError, match="zero must be positive"):
        reg.add("zero", 0)
    assert seen == [("one", 1)] and reg.names() == ["one"]


def _method(name: str, entry: Any) -> None:
    assert inspect.isclass(entry) and issubclass(entry, Method)
    assert entry.name == name and method_class(name) is entry


def _backbone(name: str, entry: Any) -> None:
    net, dim = entry(cifar_stem=True)
    assert isinstance(net, nn.Module) and isinstance(dim, int) and dim > 0
    assert create_backbone(name)[1] == dim
    check_backbone(name)


def _search_backend(name: str, entry: Any) -> None:
    assert inspect.isclass(entry) and issubclass(entry, KeySearcher)
    assert entry.name == name and name in available_backends()


def _recipe(name: str, entry: Any) -> None:
    recipe = entry(32)
    assert isinstance(recipe, TwoViewRecipe) and recipe.name == name


def _source(name: str, entry: Any) -> None:
    assert name in FORMATS
    params = list(inspect.signature(entry).parameters)
    assert len(params) == 2 and inspect.signature(entry).return_annotation == "Source"
    if name in ("digits", "synthetic"):  # built in: opens without files
        src = entry(name, SourceOptions(n=10, size=8))
        assert src.kind == name and src.units()


def _protocol(name: str, entry: Any) -> None:
    assert isinstance(entry, Protocol)
    cfg = EvalConfig(checkpoints=["c"], dataset="d", out="o", voc_root="v", protocols=[name])
    cfg.validate_settings()
    calls = entry.calls(cfg, {"uri": "c"}, "features", 10)
    assert calls and all(isinstance(s, str) and callable(t) for s, t, _ in calls)


# every registry in the package, with the check an entry of its kind passes
REGISTRIES: dict[str, tuple[Registry[Any], Callable[[str, Any], None]]] = {
    "methods": (METHODS, _method),
    "backbones": (BACKBONES, _backbone),
    "search_backends": (SEARCH_BACKENDS, _search_backend),
    "recipes": (RECIPES, _recipe),
    "sources": (SOURCES, _source),
    "protocols": (PROTOCOLS, _protocol),
}
ENTRIES = [(kind, name) for kind, (reg, _) in REGISTRIES.items() for name in reg.names()]


@pytest.mark.parametrize(("kind", "name"), ENTRIES)
def test_every_registered_name_is_an_entry_of_its_kind(kind: str, name: str) -> None:
    reg, check = REGISTRIES[kind]
    check(name, reg.get(name))


@pytest.mark.parametrize("kind", REGISTRIES)
def test_every_registry_refuses_a_duplicate_and_names_choices(kind: str) -> None:
    reg, _ = REGISTRIES[kind]
    assert len(reg) >= 2, f"{kind}: expected a populated registry"
    names = reg.names()
    with pytest.raises(ValueError, match="already registered"):
        reg.add(names[0], reg.get(names[0]))
    assert reg.names() == names
    with pytest.raises(SeppError, match="unknown") as err:
        reg.get("no-such-entry")
    assert all(repr(n) in str(err.value) for n in names)


def test_registries_back_the_public_lists() -> None:
    assert list_methods() == METHODS.names()
    assert FORMATS == ("auto", *SOURCES.names())
    assert set(available_backends(exact=True)) < set(SEARCH_BACKENDS)


def test_check_backbone_takes_aliases_and_timm_names_and_suggests() -> None:
    check_backbone("resnet18_cifar")
    check_backbone("resnet18")
    with pytest.raises(SeppError, match=r"unknown backbone 'resnt18'.*'resnet18'"):
        check_backbone("resnt18")
    with pytest.raises(SeppError, match=r"timm\.list_models.*resnet18_cifar"):
        check_backbone("qqqqqqqq")
