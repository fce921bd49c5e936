"""Sources that need no files: scikit-learn's digits (the built-in default) and synthetic images.

digits: 1,797 real 8x8 handwritten digits shipped inside scikit-learn, upscaled to 32x32 RGB, so
the whole system runs end to end on a fresh machine with no download. A seeded 80/20 split gives
"train" and "test".

synthetic: seeded random shapes on random backgrounds, ten classes (shape x colour family), for
tests and smoke runs at any size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sepp_ray.data.sources.base import RawItem, WorkUnit, chunks
from sepp_ray.errors import SeppError


class DigitsSource:
    """scikit-learn's ``load_digits``: 1,797 images, 10 classes."""

    kind = "digits"

    def __init__(
        self, size: int = 32, test_fraction: float = 0.2, seed: int = 0, chunk_size: int = 500
    ) -> None:
        from sklearn.datasets import load_digits

        if size < 8:
            raise SeppError(f"digits size must be >= 8 (the originals are 8x8), got {size}")
        d = load_digits()
        self.images = d.images  # 1797 x 8 x 8 float64 in [0, 16]
        self.targets = d.target.astype(np.int64)
        self.size = size
        self.test_fraction = test_fraction
        self.seed = seed
        self.chunk_size = chunk_size
        order = np.random.default_rng(seed).permutation(len(self.targets))
        n_test = int(round(len(order) * test_fraction))
        self.split = np.full(len(order), "train", dtype=object)
        self.split[order[:n_test]] = "test"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "size": self.size,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "origin": "sklearn.datasets.load_digits",
        }

    def class_names(self) -> list[str]:
        return [str(i) for i in range(10)]

    def units(self) -> list[WorkUnit]:
        return [{"start": a, "stop": b} for a, b in chunks(len(self.targets), self.chunk_size)]

    def read_unit(self, unit: WorkUnit) -> Iterator[RawItem]:
        for i in range(unit["start"], unit["stop"]):
            # Ink is 16 on a 0 background: invert to dark ink on white paper, like a scan.
            gray = (255 - self.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(gray, "L").resize(
                (self.size, self.size), Image.Resampling.BICUBIC
            )
            rgb = np.asarray(img.convert("RGB"))
            yield RawItem(
                f"digits/{i}", f"sklearn-digits#{i}", rgb, int(self.targets[i]), str(self.split[i])
            )

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.images.tobytes())
        h.update(f"{self.size}/{self.test_fraction}/{self.seed}".encode())
        return h.hexdigest()


SHAPES = ("disc", "square", "triangle", "cross", "ring")
FAMILIES = ("warm", "cool")


class SyntheticSource:
    """Seeded shapes: class = shape x colour family (10 classes); any count and size."""

    kind = "synthetic"

    def __init__(
        self,
        n: int = 1000,
        size: int = 32,
        test_fraction: float = 0.2,
        seed: int = 0,
        chunk_size: int = 500,
    ) -> None:
        if n <= 0:
            raise SeppError(f"synthetic n must be positive, got {n}")
        self.n, self.size, self.test_fraction, self.seed = n, size, test_fraction, seed
        self.chunk_size = chunk_size

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n": self.n,
            "size": self.size,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
        }

    def class_names(self) -> list[str]:
        return [f"{s}-{f}" for s in SHAPES for f in FAMILIES]

    def units(self) -> list[WorkUnit]:
        return [{"start": a, "stop": b} for a, b in chunks(self.n, self.chunk_size)]

    def render(self, i: int) -> tuple[np.ndarray, int, str]:
        rng = np.random.default_rng([self.seed, i])
        label = int(rng.integers(10))
        shape, family = SHAPES[label // 2], FAMILIES[label % 2]
        s = self.size
        bg = tuple(int(v) for v in rng.integers(0, 90, 3))
        img = Image.new("RGB", (s, s), bg)
        draw = ImageDraw.Draw(img)
        hi, lo = int(rng.integers(170, 256)), int(rng.integers(0, 90))
        mid = int(rng.integers(60, 200))
        color = (hi, mid, lo) if family == "warm" else (lo, mid, hi)
        r = s * rng.uniform(0.2, 0.35)
        cx, cy = s * rng.uniform(0.35, 0.65, 2)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "disc":
            draw.ellipse(box, fill=color)
        elif shape == "square":
            draw.rectangle(box, fill=color)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        elif shape == "cross":
            w = r / 3
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
        else:
            draw.ellipse(box, outline=color, width=max(1, int(r / 3)))
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (s, s, 3))
        split = "test" if rng.uniform() < self.test_fraction else "train"
        return arr.clip(0, 255).astype(np.uint8), label, split

    def read_unit(self, unit: WorkUnit) -> Iterator[RawItem]:
        for i in range(unit["start"], unit["stop"]):
            arr, label, split = self.render(i)
            yield RawItem(f"synthetic/{self.seed}/{i}", f"synthetic#{i}", arr, label, split)

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(sorted(self.describe().items())).encode()).hexdigest()
