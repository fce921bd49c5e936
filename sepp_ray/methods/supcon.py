"""Supervised contrastive learning (Khosla et al., arXiv 2004.11362): the oracle upper bound.

Positives are the images of the anchor's class (SupCon's L_out loss, eq. 2), from the `labels`
of the batch: the ceiling that mined semantic positives (SePP) approach without labels. Without
labels SupCon would be SimCLR at another temperature, so it refuses to train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sepp_ray import dist
from sepp_ray.errors import SeppError
from sepp_ray.methods.base import METHODS, Inputs, Metrics
from sepp_ray.methods.simclr import SimCLR, SimCLRHParams, contrastive_loss


@dataclass
class SupConHParams(SimCLRHParams):
    """SupCon hyperparameters: 2-layer MLP 2048 -> 128 head, temperature 0.1 (paper, sec. 4)."""

    temperature: float = 0.1


@METHODS.register("supcon")
class SupCon(SimCLR):
    """SimCLR's model; a query's positives are the keys of its class.

    An unlabeled image (label -1) keeps its own other view as its one positive, the only key
    certain to share its class. `pos_ids` ("attract") add positives beyond the labels;
    cancellation is refused: with labels there is no false negative left to cancel.
    """

    default_recipe = "simclr"
    hparams_cls = SupConHParams
    pair_uses = frozenset({"none", "attract"})
    needs_labels = True

    def loss(self, x: Inputs) -> tuple[torch.Tensor, Metrics]:
        views, ids, labels = x.views, x.ids, x.labels
        if labels is None or labels.shape != ids.shape:
            got = None if labels is None else tuple(labels.shape)
            raise SeppError(
                f"supcon needs the class label of every image (shape {tuple(ids.shape)}, got "
                f"{got}): train it on a labelled dataset, or choose a self-supervised method"
            )
        # every rank sees the gathered labels, so every rank raises or none does; a host sync
        # and a collective, so only while checks run (a run's first step)
        if dist.checks_enabled() and not bool((dist.gather(labels) >= 0).any()):
            raise SeppError(
                "supcon got a batch with no labelled image (every label is -1): train it on a "
                "labelled dataset, or choose a self-supervised method"
            )
        z = self.projector(self.backbone(torch.cat(views[:2])))  # 2N x D
        return contrastive_loss(z, x, self.hp.temperature, self.hp.aug_weight, labels)
