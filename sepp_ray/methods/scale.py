"""Method hyperparameters per data scale: the papers' defaults are ImageNet's, and some do not
carry over to CIFAR-size data.

"Small" data is a training split of fewer than `SMALL_IMAGES` images (CIFAR-10/100: 50,000;
STL-10's labelled train: 5,000; the demo digits; a 20-class ImageNet subset), counted as the
plain run's items, so every arm of a comparison gets the same recipe. What changes there:

- MoCo-v2: queue 4,096 and key-encoder momentum 0.99, the settings of the MoCo authors' CIFAR-10
  demo (facebookresearch/moco, ``colab/moco_cifar10_demo.ipynb``: K = 4096, m = 0.99) in place of
  ImageNet's 65,536 and 0.999 (arXiv 2003.04297; MoCo arXiv 1911.05722 sec. 3.2): with 50,000
  images a 65,536-key queue would hold every image's older keys, and a shorter run needs a
  faster-moving key encoder.

DINO on a ResNet takes its optimiser from the authors' ResNet-50 recipe
(`sepp_ray.train.optim_defaults`), not a hyperparameter from here. Explicit hyperparameters
always win over a scale's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SMALL_IMAGES = 100_000

# method -> hyperparameter defaults on small data (see the module docstring for the sources)
SMALL_DATA_HPARAMS: dict[str, dict[str, Any]] = {
    "mocov2": {"queue_size": 4096, "momentum": 0.99},
}


@dataclass(frozen=True)
class DataScale:
    """What a recipe reads of the data: the split's images (the plain run's items) and the
    backbone's name."""

    images: int
    backbone: str = ""

    @property
    def small(self) -> bool:
        """CIFAR-size: fewer than `SMALL_IMAGES` training images."""
        return self.images < SMALL_IMAGES

    @property
    def name(self) -> str:
        return "small" if self.small else "large"


def scale_hparams(method: str, scale: DataScale) -> dict[str, Any]:
    """`method`'s hyperparameter defaults at `scale` (empty: the paper's ImageNet values)."""
    return dict(SMALL_DATA_HPARAMS.get(method, {})) if scale.small else {}
