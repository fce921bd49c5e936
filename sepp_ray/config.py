"""Typed config dataclasses from YAML files and ``key=value`` overrides (dotted for nesting).

Precedence: dataclass defaults < YAML file (``--config``) < ``key=value`` on the command line.
Unknown keys and values of the wrong type are errors that name the valid keys. Each field may
carry ``metadata={"help": ...}``; ``describe`` turns them into the CLI's help text.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any, TypeVar, Union

import yaml

from sepp_ray.errors import SeppError

T = TypeVar("T")


def opt(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and a help text."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a ``key=value`` string) to the annotated type."""
    base, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
        if optional:
            return None
        raise SeppError(f"{key} cannot be empty (null)")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        origin = typing.get_origin(base)
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(base) or (Any,)
            items = yaml.safe_load(value) if isinstance(value, str) else value
            if isinstance(items, str):
                items = [s for s in items.split(",") if s]
            if not isinstance(items, (list, tuple)):
                items = [items]
            out = [coerce(v, item_tp, key) if item_tp is not Any else v for v in items]
            return out if origin is list else tuple(out)
        if typing.get_origin(base) is typing.Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise ValueError(value)
            return value
        if base is Any:
            return yaml.safe_load(value) if isinstance(value, str) else value
    except (TypeError, ValueError) as e:
        raise SeppError(f"{key}: cannot read {value!r} as {_type_name(tp)}") from e
    return value


def _type_name(tp: Any) -> str:
    base, optional = _unwrap_optional(tp)
    name = getattr(base, "__name__", str(base).replace("typing.", ""))
    return f"{name} or null" if optional else name


def build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Instantiate ``cls`` from a (nested) dict, checking keys and types."""
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SeppError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; valid keys: "
            f"{', '.join(prefix + k for k in known)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        tp = hints[name]
        if is_dataclass(tp):
            if not isinstance(value, dict):
                raise SeppError(f"{prefix}{name} must be a mapping of its own keys")
            kwargs[name] = build(tp, value, prefix=f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = coerce(value, tp, prefix + name)
    missing = [
        n
        for n, f in known.items()
        if n not in kwargs
        and f.default is MISSING
        and f.default_factory is MISSING
        and not is_dataclass(hints[n])
    ]
    if missing:
        raise SeppError(f"missing required config key(s): {', '.join(prefix + m for m in missing)}")
    for n in known:
        if (
            n not in kwargs
            and is_dataclass(hints[n])
            and known[n].default_factory is MISSING
            and known[n].default is MISSING
        ):
            kwargs[n] = build(hints[n], {}, prefix=f"{prefix}{n}.")
    return cls(**kwargs)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": "1"}, "c": "x"}`` (values stay strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SeppError(f"expected key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SeppError(f"{key}: {p} is not a section")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str) -> dict[str, Any]:
    from sepp_ray.storage import filesystem

    fs, p = filesystem(path)
    if not fs.exists(p):
        raise SeppError(f"config file {path} does not exist")
    with fs.open(p, "r") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise SeppError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SeppError(f"config file {path} must hold a mapping of keys to values")
    return data


def load(
    cls: type[T],
    config_file: str | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    command_line: dict[str, Any] | None = None,
) -> T:
    """Defaults < ``base`` < YAML file < ``command_line`` values (positional arguments: what
    the user typed beats a shared config file) < ``key=value`` overrides."""
    values: dict[str, Any] = dict(base or {})
    if config_file:
        values = merge(values, read_yaml(config_file))
    values = merge(values, dict(command_line or {}))
    values = merge(values, parse_overrides(overrides or []))
    return build(cls, values)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf key of ``cls``; nested keys dotted."""
    rows: list[tuple[str, str, str, str]] = []
    hints = _hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            rows.extend(describe(tp, prefix=f"{prefix}{f.name}."))  # type: ignore[arg-type]
            continue
        if f.default is not MISSING:
            default = repr(f.default)
        elif f.default_factory is not MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((prefix + f.name, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
