"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of Wu et al. (Instance Discrimination, arXiv 1805.01978) that SimCLR, MoCo, DINO
(arXiv 2104.14294) and solo-learn report: cosine similarity to every training feature, the
k most similar vote for their class with weight exp(s / t). It needs no training, so it is the
cheap per-epoch monitor of pretraining as well as a final metric. Pure torch, runs on the device
of the training features, and queries in chunks so N x chunk similarities bound the memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sepp_ray.errors import SeppError

# similarities held at once (chunk x N floats): 64M floats = 256 MB
_SIM_BUDGET = 1 << 26


def _check(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise SeppError(
            f"kNN needs 2-d features, got train {tuple(train_feats.shape)} and "
            f"test {tuple(test_feats.shape)}"
        )
    if train_feats.shape[1] != test_feats.shape[1]:
        raise SeppError(
            f"train features are {train_feats.shape[1]}-d but test features are "
            f"{test_feats.shape[1]}-d: extract both with the same backbone"
        )
    if train_labels.shape != (train_feats.shape[0],):
        raise SeppError(
            f"{train_feats.shape[0]} train features but labels of shape {tuple(train_labels.shape)}"
        )
    if train_feats.shape[0] == 0:
        raise SeppError("kNN needs at least one labeled training feature")
    if num_classes < 1:
        raise SeppError(f"num_classes must be >= 1, got {num_classes}")


@torch.no_grad()
def knn_scores(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int | None = None,
) -> Tensor:
    """Class scores (M x C, each row sums to 1) of the temperature-weighted kNN vote.

    ``train_labels`` are class indices; rows labelled < 0 (unlabeled) are ignored. Features need
    not be normalised: cosine similarity normalises them.
    """
    _check(train_feats, train_labels, test_feats, num_classes)
    if k < 1:
        raise SeppError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise SeppError(f"temperature must be > 0, got {temperature}")
    device = train_feats.device
    keep = train_labels >= 0
    train = F.normalize(train_feats[keep].float(), dim=1)  # train: N x D
    labels = train_labels[keep].to(device=device, dtype=torch.long)  # labels: N
    n = train.shape[0]
    if n == 0:
        raise SeppError("kNN needs at least one labeled training feature (all are unlabeled)")
    if int(labels.max()) >= num_classes:
        raise SeppError(f"a train label is {int(labels.max())} but num_classes={num_classes}")
    kk = min(k, n)
    step = chunk or max(1, min(test_feats.shape[0], _SIM_BUDGET // n))
    out = []
    for start in range(0, test_feats.shape[0], step):
        q = F.normalize(test_feats[start : start + step].to(device).float(), dim=1)  # q: B x D
        sim = q @ train.T  # sim: B x N
        top_s, top_i = sim.topk(kk, dim=1)  # each B x k, most similar first
        # exp(s/t) shifted by the row's best: same ranking, no overflow for small t
        w = ((top_s - top_s[:, :1]) / temperature).exp()  # w: B x k
        votes = torch.zeros(q.shape[0], num_classes, device=device)  # votes: B x C
        votes.scatter_add_(1, labels[top_i], w)
        out.append(votes / votes.sum(dim=1, keepdim=True))
    if not out:
        return torch.zeros(0, num_classes, device=device)
    return torch.cat(out)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Share of rows whose label is among the ``k`` highest scores, per k (capped at C)."""
    if scores.shape[0] != labels.shape[0]:
        raise SeppError(f"{scores.shape[0]} predictions but {labels.shape[0]} labels")
    if scores.shape[0] == 0:
        raise SeppError("no labeled test example to score")
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # top: M x kmax
    hit = top == labels.to(scores.device, torch.long)[:, None]  # hit: M x kmax
    return [float(hit[:, : min(k, scores.shape[1])].any(dim=1).float().mean()) for k in ks]


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int | None = None,
) -> dict[str, float]:
    """kNN top-1 / top-5 accuracy (fractions in [0, 1]) of ``test_feats`` against the train set.

    Test rows labelled < 0 are left out of the accuracy.
    """
    if test_labels.shape != (test_feats.shape[0],):
        raise SeppError(
            f"{test_feats.shape[0]} test features but labels of shape {tuple(test_labels.shape)}"
        )
    sel = test_labels >= 0
    scores = knn_scores(
        train_feats, train_labels, test_feats[sel], num_classes, k, temperature, chunk
    )
    top1, top5 = topk_accuracy(scores, test_labels[sel])
    return {"top1": top1, "top5": top5}
