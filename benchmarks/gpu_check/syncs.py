"""Count the host synchronisations a training step makes.

On CUDA, `torch.cuda.set_sync_debug_mode("warn")` reports every synchronising CUDA call. On CPU
no call waits for a device, so `SyncCounter` counts the calls that *would* wait on a GPU: the
aten ops that copy a device value to the host or whose output shape depends on the data
(`_local_scalar_dense` under `.item()`, `bool()`, `float()`; `nonzero`, `masked_select`, ...),
the Python reads `tolist` / `numpy`, and torch.distributed collectives called from Python.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that make the host wait for the device (or whose output size needs the data)
SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique",
    "_unique2",
    "unique_consecutive",
    "item",
    "is_nonzero",
    "equal",
}
COLLECTIVES = ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "barrier")


def _bool_index(args: Any) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
    )


class _Ops(TorchDispatchMode):
    def __init__(self, seen: Counter[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.seen[f"aten.{name}"] += 1
        elif name in ("index", "index_put", "index_put_") and _bool_index(args):
            self.seen[f"aten.{name}(bool mask)"] += 1  # a nonzero inside: the size needs the data
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """`with counter.counting(): ...` adds what the block did to `counter.seen` (name -> count)."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def _wrap(self, owner: Any, attr: str, label: str) -> Callable[[], None]:
        real = getattr(owner, attr)

        def spy(*a: Any, **k: Any) -> Any:
            self.seen[label] += 1
            return real(*a, **k)

        setattr(owner, attr, spy)
        return lambda: setattr(owner, attr, real)

    @contextmanager
    def counting(self) -> Iterator[None]:
        undo = [self._wrap(torch.Tensor, m, f"Tensor.{m}") for m in ("tolist", "numpy")]
        undo += [self._wrap(torch_dist, c, f"dist.{c}") for c in COLLECTIVES]
        try:
            with _Ops(self.seen):
                yield
        finally:
            for u in undo:
                u()

    def total(self) -> int:
        return sum(self.seen.values())


@contextmanager
def cuda_sync_warnings() -> Iterator[list[str]]:
    """CUDA only: the synchronising calls of the block, as `set_sync_debug_mode` reports them."""
    found: list[str] = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
            torch.cuda.set_sync_debug_mode(0)
        found += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
