"""Config dataclasses from YAML and key=value overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sepp_ray import config as cfg
from sepp_ray.config import opt
from sepp_ray.errors import SeppError


@dataclass
class Inner:
    lo: float = opt(0.96, "lower threshold")
    size: int | None = opt(None, "a size")


@dataclass
class Outer:
    name: str = opt("x", "a name")
    flag: bool = opt(False, "a flag")
    tags: list[str] = opt([], "tags")
    inner: Inner = field(default_factory=Inner)


def test_defaults_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("name: fromfile\ninner:\n  lo: 0.5\n  size: 3\n")
    c = cfg.load(Outer, str(f), ["inner.size=7", "flag=true", "tags=a,b"])
    assert c == Outer(name="fromfile", flag=True, tags=["a", "b"], inner=Inner(lo=0.5, size=7))
    assert cfg.load(Outer) == Outer()
    assert cfg.load(Outer, None, ["inner.size=null"]).inner.size is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["nope=1"], "unknown config key(s) nope"),
        (["inner.hi=1"], "unknown config key(s) inner.hi"),
        (["inner.lo=abc"], "inner.lo: cannot read 'abc' as float"),
        (["flag=maybe"], "flag: cannot read 'maybe' as bool"),
        (["inner.size=1.5"], "inner.size: cannot read '1.5'"),
        (["novalue"], "expected key=value"),
    ],
)
def test_bad_overrides_name_the_problem(overrides: list[str], message: str) -> None:
    with pytest.raises(SeppError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.load(Outer, None, overrides)


def test_bad_yaml_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("- a list\n- not a mapping\n")
    with pytest.raises(SeppError, match="must hold a mapping"):
        cfg.load(Outer, str(f))
    with pytest.raises(SeppError, match="does not exist"):
        cfg.load(Outer, str(tmp_path / "missing.yaml"))


def test_describe_lists_nested_keys_with_help() -> None:
    rows = {k: (t, d, h) for k, t, d, h in cfg.describe(Outer)}
    assert rows["inner.lo"] == ("float", "0.96", "lower threshold")
    assert rows["inner.size"][0] == "int or null"
