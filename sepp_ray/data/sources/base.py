"""The contract every image source follows.

A source is split into small picklable *work units* (a chunk of files, a slice of a binary
batch) so that Ray Data can read, decode and write them in parallel; ``read_unit`` turns one
unit into raw items. Sources never decode or validate: that is ``sepp_ray.data.images``' job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# Encoded file bytes (JPEG, PNG, ...) or a decoded array: HxW or HxWxC, uint8 or uint16.
Payload = bytes | np.ndarray
WorkUnit = dict[str, Any]


@dataclass(frozen=True)
class RawItem:
    """One image as a source yields it, before decoding and validation."""

    key: str  # stable and unique within the source; the image id is derived from it
    origin: str  # where a human finds it (a path, "file#index"): used in logs and skip lists
    payload: Payload
    label: int | None  # index into the source's class_names, None when unlabeled
    split: str  # "train", "test", "unlabeled", ...
    skip: str | None = None  # set by a source that already knows the item is unusable


class Source(Protocol):
    """What ingest needs from a source."""

    kind: str  # "imagefolder", "cifar10", ...

    def describe(self) -> dict[str, Any]:
        """Source identity for the manifest: kind, uri, options."""
        ...

    def class_names(self) -> list[str]:
        """Class names in label order; empty when the source has no labels."""
        ...

    def units(self) -> list[WorkUnit]:
        """Deterministic list of picklable work units covering the whole source."""
        ...

    def read_unit(self, unit: WorkUnit) -> Iterator[RawItem]:
        """Raw items of one unit, in a deterministic order."""
        ...

    def fingerprint(self) -> str:
        """A hex digest that changes when the source's content changes."""
        ...


def image_id(key: str) -> int:
    """Stable positive int64 id of an item key (blake2b, 63 bits): same key, same id, any run."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering range(n) in pieces of at most ``size``."""
    return [(i, min(i + size, n)) for i in range(0, n, size)]
