"""The evaluation protocols behind `sepp eval`: a registry of what each one reads (the cached
frozen features, or the checkpoint itself) and the Ray task calls it makes per checkpoint.
Adding a protocol is one entry here: `PROTOCOLS.add(name, Protocol(...))`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sepp_ray.eval.detection import run_detection
from sepp_ray.eval.semisup import run_semisup
from sepp_ray.registry import Registry

# One Ray task call: (sub-key of its result, "" when a protocol has one; task; its arguments).
TaskCall = tuple[str, Callable[..., Any], tuple[Any, ...]]


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol: whether it reads the cached frozen features, and its task calls
    for one checkpoint, `calls(cfg, checkpoint, features_uri, num_classes)`."""

    features: bool
    calls: Callable[[Any, dict[str, Any], str, int], list[TaskCall]]


def _knn_calls(cfg: Any, ckpt: dict[str, Any], feat: str, classes: int) -> list[TaskCall]:
    splits = (cfg.train_split, cfg.test_split)
    return [("", _knn_task, (feat, splits, classes, cfg.k, cfg.temperature))]


def _linear_calls(cfg: Any, ckpt: dict[str, Any], feat: str, classes: int) -> list[TaskCall]:
    splits = (cfg.train_split, cfg.test_split)
    return [("", _linear_task, (feat, splits, classes, cfg.linear, cfg.seed))]


def _semisup_calls(cfg: Any, ckpt: dict[str, Any], feat: str, classes: int) -> list[TaskCall]:
    split, test = cfg.train_split, cfg.test_split
    return [
        (str(f), run_semisup, (ckpt["uri"], cfg.dataset, f, split, test, cfg.semisup, cfg.seed))
        for f in cfg.label_fractions
    ]


def _detection_calls(cfg: Any, ckpt: dict[str, Any], feat: str, classes: int) -> list[TaskCall]:
    return [("", run_detection, (ckpt["uri"], cfg.voc_root, cfg.detection, cfg.seed))]


def _labeled_features(
    feat_uri: str, splits: tuple[str, str]
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, int]]:
    """The labelled cached features of the (train, test) splits on the task's device:
    (train feats, train labels, test feats, test labels) and the two split sizes."""
    from sepp_ray.eval.features import load_features

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tr = load_features(feat_uri, splits[0]).labeled()
    te = load_features(feat_uri, splits[1]).labeled()
    t = [torch.from_numpy(a).to(dev) for a in (tr.feats, tr.labels, te.feats, te.labels)]
    return (t[0], t[1], t[2], t[3]), {"train_size": len(tr.ids), "test_size": len(te.ids)}


def _knn_task(
    feat_uri: str, splits: tuple[str, str], num_classes: int, k: int, temperature: float
) -> dict[str, Any]:
    from sepp_ray.models.knn import knn_classify

    tensors, sizes = _labeled_features(feat_uri, splits)
    res = knn_classify(*tensors, num_classes, k=k, temperature=temperature)
    return {**res, "k": k, "temperature": temperature, **sizes}


def _linear_task(
    feat_uri: str, splits: tuple[str, str], num_classes: int, cfg: Any, seed: int
) -> dict[str, Any]:
    from sepp_ray.eval.linear import linear_probe

    tensors, _ = _labeled_features(feat_uri, splits)
    return linear_probe(*tensors, num_classes, cfg, seed=seed)


PROTOCOLS: Registry[Protocol] = Registry("protocol")
PROTOCOLS.add("knn", Protocol(features=True, calls=_knn_calls))
PROTOCOLS.add("linear", Protocol(features=True, calls=_linear_calls))
PROTOCOLS.add("semisup", Protocol(features=False, calls=_semisup_calls))
PROTOCOLS.add("detection", Protocol(features=False, calls=_detection_calls))
