"""The parts of the GPU check, in the order they run, each with its time limit.

Adding a part is one line in `PARTS`: a `Part` naming a function ``fn(ctx: PartContext)`` that
calls ``ctx.add`` per figure (`benchmarks.gpu_check.common`). The order is the priority: the
figures the GPU runs exist for come first (the training step through Ray Train, then 224 px
with decode_on=gpu), so when time runs out the least needed parts are the ones cut. The full
limits add up to at most `BUDGET_S`, the check's whole budget (a GPU command gets 10 minutes at
the most; the device bundle's set-up and the start-up come on top).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

from benchmarks.gpu_check.common import PartFn

BUDGET_S = 420  # seconds for all parts at full size: 7 minutes


@dataclass(frozen=True)
class Part:
    """A part: ``target`` ("module:function"; a bare module name is one of
    benchmarks.gpu_check's, imported only in the part's own process), its limit in seconds at
    full size, and in the tiny mode (a bound for a slow, shared CPU, not what it takes)."""

    name: str
    target: str
    limit_s: int
    tiny_limit_s: int

    def fn(self) -> PartFn:
        module, func = self.target.split(":")
        if "." not in module:
            module = f"benchmarks.gpu_check.{module}"
        fn: PartFn = getattr(import_module(module), func)
        return fn

    def limit(self, tiny: bool) -> int:
        return self.tiny_limit_s if tiny else self.limit_s


PARTS: dict[str, Part] = {
    p.name: p
    for p in (
        Part("ray_train", "train:ray_train", 70, 300),
        Part("train224", "train:train224", 70, 300),
        Part("step", "steps:step", 40, 180),
        Part("ranks", "ranks:ranks", 30, 180),
        Part("embed", "inference:embed", 80, 240),
        Part("syncs", "steps:syncs", 20, 120),
        Part("mining", "inference:mining", 20, 90),
        Part("gpu_tests", "suite:gpu_tests", 30, 120),
        Part("compiled", "steps:compiled", 40, 180),  # inductor compiles: cut first
        Part("feed", "feed:feed_part", 20, 240),  # the feed-depth grid: context, not a target
    )
}
