"""One registry pattern for every pluggable kind (methods, backbones, search backends, recipes,
sources, eval protocols): a name maps to one entry, a second registration of a name is refused,
and an unknown name is a `SeppError` that lists the choices.

    METHODS: Registry[type[Method]] = Registry("method")

    @METHODS.register("simclr")
    class SimCLR(Method): ...

    METHODS.get("simclr")    # the class
    METHODS.names()          # sorted names
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sepp_ray.errors import SeppError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> entries of one kind. Registration order is kept; `names()` is sorted."""

    def __init__(self, kind: str, on_add: Callable[[str, T], None] | None = None) -> None:
        """``on_add(name, entry)`` runs before an entry is stored: a kind's own checks, or an
        entry that records its name (method and search-backend classes do)."""
        self.kind = kind
        self._on_add = on_add
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; ValueError (a programming error) on a duplicate."""
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if self._on_add is not None:
            self._on_add(name, entry)
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`."""

        def deco(entry: T) -> T:
            return self.add(name, entry)

        return deco

    def get(self, name: str) -> T:
        """The entry of ``name``; SeppError naming the choices for an unknown one."""
        if name not in self._entries:
            raise SeppError(f"unknown {self.kind} {name!r}: choose one of {self.names()}")
        return self._entries[name]

    def check(self, name: str) -> None:
        """`get` for its error only: validate a user's choice before any work."""
        self.get(name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
