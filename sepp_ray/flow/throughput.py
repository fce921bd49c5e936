"""The figures a dry-run plan estimates with, each saying where it comes from.

A plan is only as good as its figures, so every one is a `Figure` with its source: a
measurement (DESIGN.md's "Measured ceilings" on one H100, or benchmarks/RESULTS.md on the dev
VM) or a stated estimate, kept until someone measures it. A workload that was not measured is
scaled from the nearest measured one by forward FLOPs per image, counted on the meta device
(no weights, no compute), and says so. Replace an estimate here when a measurement exists.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sepp_ray.errors import SeppError

CEILINGS = "DESIGN.md, Measured ceilings (one H100, bf16, channels_last)"


@dataclass(frozen=True)
class Figure:
    """A throughput (or time) and where it comes from."""

    value: float
    unit: str
    what: str
    source: str
    measured: bool

    def cite(self) -> str:
        kind = "measured" if self.measured else "estimate"
        return f"{self.what}: {number(self.value)} {self.unit} ({kind}: {self.source})"

    @property
    def identity(self) -> bool:
        """A measured factor of 1 (the H100 against itself, SimCLR against itself)."""
        return self.measured and self.value == 1.0 and self.unit.startswith("x ")


def number(value: float) -> str:
    """3 significant digits, thousands separated: 26,500, 8.6, 0.15."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


@dataclass(frozen=True)
class Gpu:
    """A GPU kind: its speed relative to the H100 the ceilings were measured on, and the
    vCPUs per GPU of the node type it usually comes in (ingest and decode run on those)."""

    name: str
    speed: Figure  # x one H100, for training and inference steps alike
    vcpus_per_gpu: int
    node: str


GPUS: dict[str, Gpu] = {
    "h100": Gpu(
        "NVIDIA H100 80 GB",
        Figure(1.0, "x H100", "H100 speed", "the card of " + CEILINGS, True),
        24,
        "p5.48xlarge: 8 GPUs, 192 vCPUs",
    ),
    "h200": Gpu(
        "NVIDIA H200 141 GB",
        Figure(
            1.0,
            "x H100",
            "H200 speed",
            "the H100's tensor cores with more memory: taken as fast as an H100 until measured",
            False,
        ),
        24,
        "p5e.48xlarge: 8 GPUs, 192 vCPUs",
    ),
    "a100": Gpu(
        "NVIDIA A100 40 GB",
        Figure(
            0.5,
            "x H100",
            "A100 speed",
            "dense bf16 peak 312 against the H100's 989 TFLOPS, "
            "of which a ResNet step reaches a larger share on the A100: half, until measured",
            False,
        ),
        12,
        "p4d.24xlarge (cluster.yaml): 8 GPUs, 96 vCPUs",
    ),
    "l4": Gpu(
        "NVIDIA L4 24 GB",
        Figure(
            0.15,
            "x H100",
            "L4 speed",
            "dense bf16 peak 121 against 989 TFLOPS and a "
            "tenth of the memory bandwidth, until measured",
            False,
        ),
        24,
        "g6.48xlarge: 8 GPUs, 192 vCPUs",
    ),
}

# SimCLR train steps (two views per pair) on one H100: (backbone, cifar_stem, side) -> figure
TRAIN_MEASURED: dict[tuple[str, bool, int], Figure] = {
    ("resnet18", True, 32): Figure(
        26_500, "pairs/s", "SimCLR ResNet-18 (CIFAR stem) 32 px step", CEILINGS + ", eager", True
    ),
    ("resnet50", False, 96): Figure(
        8_600, "pairs/s", "SimCLR ResNet-50 96 px step", CEILINGS, True
    ),
    ("resnet50", False, 224): Figure(
        2_000, "pairs/s", "SimCLR ResNet-50 224 px step", CEILINGS, True
    ),
}
EMBED_MEASURED: dict[tuple[str, bool, int], Figure] = {
    ("resnet50", False, 224): Figure(
        13_100, "images/s", "ResNet-50 224 px embedding", CEILINGS, True
    ),
}
SEARCH = Figure(
    3.65,
    "s",
    "exact cosine search, 64k queries x 1.28M keys x 2048-d (fp16 matmul + top-k)",
    CEILINGS,
    True,
)
SEARCH_SHAPE = (64_000, 1_281_167, 2048)

# A method's step against SimCLR's at the same backbone, images and batch. A momentum or
# teacher encoder adds a forward of both views without a backward: about a third of a step.
METHOD_COST: dict[str, Figure] = {
    "simclr": Figure(1.0, "x SimCLR", "SimCLR step", "the measured method", True),
    **{
        m: Figure(
            4 / 3,
            "x SimCLR",
            f"{m} step",
            "a momentum/teacher encoder's forward of both views "
            "(a third of a forward + backward), until measured",
            False,
        )
        for m in ("mocov2", "byol", "dino")
    },
}
DEFAULT_METHOD_COST = Figure(
    1.0,
    "x SimCLR",
    "step of a method without a momentum encoder",
    "one encoder, two views, as SimCLR, until measured",
    False,
)

DDP_EFFICIENCY = Figure(
    0.9,
    "of linear",
    "data-parallel scaling over several GPUs",
    "gradient all-reduce overlapped with the backward; not measured on a cluster yet "
    "(jobs/README.md, Throughput per node)",
    False,
)
INGEST: dict[str, Figure] = {
    "keep": Figure(
        3_200,
        "images/s per vCPU",
        "ingest, encoded files kept byte for byte",
        "benchmarks/RESULTS.md, Ingest: 6,451 images/s on 2 vCPUs (32 px JPEG)",
        True,
    ),
    "arrays": Figure(
        1_000,
        "images/s per vCPU",
        "ingest of raw arrays (CIFAR, STL-10) as PNG",
        "a 96 px PNG encode takes about 1 ms with Pillow, until measured",
        False,
    ),
    "reencode": Figure(
        100,
        "images/s per vCPU",
        "ingest with resize and JPEG re-encode (ImageNet to 256 px)",
        "decode of a ~110 kB JPEG, bicubic resize and q90 encode: about 10 ms with Pillow, "
        "until measured",
        False,
    ),
}
CPU_DECODE = Figure(
    281,
    "images/s per vCPU",
    "streaming decode, 256 px JPEG to two 224 px crops",
    "benchmarks/RESULTS.md, Epoch throughput (dev VM, per core)",
    True,
)
LINEAR_PROBE = Figure(
    1_000_000,
    "features/s",
    "linear probe on cached features (every rate at once)",
    "a 2048 x classes matmul per feature and its backward, until measured",
    False,
)
START_UP = Figure(
    60,
    "s",
    "start-up of a Ray Train or Ray Data stage on a cluster",
    "25 s measured for a Ray Train fit on the dev VM (DESIGN.md); doubled for node joins",
    False,
)


@functools.lru_cache(maxsize=64)
def forward_flops(backbone: str, cifar_stem: bool, side: int) -> tuple[float, int]:
    """(forward FLOPs of one image, feature width), counted on the meta device: the model's
    shapes only, no weights allocated and no arithmetic done."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sepp_ray.models.backbones import create_backbone

    with torch.device("meta"):
        model, dim = create_backbone(backbone, cifar_stem=cifar_stem)
        x = torch.empty(1, 3, side, side)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops()), dim


def _scaled(
    table: dict[tuple[str, bool, int], Figure], backbone: str, stem: bool, side: int, unit: str
) -> Figure:
    """The table's figure for this workload, or the nearest measured one (same backbone first,
    then closest in FLOPs) scaled by forward FLOPs per image."""
    key = (backbone, stem, side)
    if key in table:
        return table[key]
    flops, _ = forward_flops(backbone, stem, side)
    same = [k for k in table if k[0] == backbone] or list(table)
    ref = min(same, key=lambda k: abs(forward_flops(*k)[0] - flops))
    base = table[ref]
    stem_name = ", CIFAR stem" if stem else ""
    return Figure(
        base.value * forward_flops(*ref)[0] / flops,
        unit,
        f"{backbone}{stem_name} {side} px",
        f"scaled by forward FLOPs from the measured {base.what} ({base.value:,.0f} {unit})",
        False,
    )


def train_rate(method: str, backbone: str, stem: bool, side: int) -> tuple[Figure, Figure]:
    """(pairs/s of a SimCLR step on one H100 for this backbone and size, the method's cost)."""
    return _scaled(TRAIN_MEASURED, backbone, stem, side, "pairs/s"), METHOD_COST.get(
        method, DEFAULT_METHOD_COST
    )


def embed_rate(backbone: str, stem: bool, side: int) -> Figure:
    """Images/s of inference (embedding, eval features) on one H100."""
    return _scaled(EMBED_MEASURED, backbone, stem, side, "images/s")


def search_seconds(queries: int, keys: int, dim: int) -> float:
    """One H100's exact search time: the measured shape scaled by queries x keys x width."""
    q, n, d = SEARCH_SHAPE
    return SEARCH.value * (queries / q) * (keys / n) * (dim / d)


def gpu(kind: str) -> Gpu:
    if kind not in GPUS:
        raise SeppError(f"unknown GPU {kind!r}: the plan knows {', '.join(GPUS)}")
    return GPUS[kind]
