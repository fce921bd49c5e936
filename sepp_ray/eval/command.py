"""`sepp eval`: judge one or more checkpoints with the protocols SSL papers report, on Ray.

Per checkpoint: frozen features of the train and test splits (cached under OUT/features, kept
across ``overwrite`` re-runs), then kNN and the linear probe on them, semi-supervised
fine-tuning per label fraction and VOC detection, each a Ray task (one GPU where there is one).
Transfer is no special case: any ingested dataset may be evaluated, and both the pretraining
dataset (from the checkpoint's manifest, where the trainer recorded it) and the evaluation
dataset are written to the metrics. Outputs: ``metrics.json``, ``metrics.md`` (checkpoints x
metrics) and the manifest (kind "eval"), written last.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sepp_ray.config import opt
from sepp_ray.console import say
from sepp_ray.data.dataset import ImageDataset
from sepp_ray.errors import SeppError
from sepp_ray.eval.detection import DetectionConfig
from sepp_ray.eval.features import check_split, extract_features
from sepp_ray.eval.linear import LinearProbeConfig
from sepp_ray.eval.protocols import PROTOCOLS
from sepp_ray.eval.semisup import FinetuneConfig
from sepp_ray.eval.tables import headline, metrics_table
from sepp_ray.models.checkpoint import checkpoint_manifest, load_backbone
from sepp_ray.resources import gpu_wait, stage_gpus
from sepp_ray.shared_storage import check_shared_storage
from sepp_ray.storage import Location, absolute, begin_write, finish_write

log = logging.getLogger(__name__)
FEATURES = "features"


@dataclass
class EvalConfig:
    """What to evaluate, how, and where the metrics go."""

    checkpoints: list[str] = opt([], "checkpoint URIs to evaluate and compare, comma-separated")
    dataset: str = opt("", "an ingested image dataset URI (any: the pretraining one or another)")
    train_split: str = opt("train", "split the kNN bank / linear probe / fine-tuning learn from")
    test_split: str = opt("test", "split the accuracies are measured on")
    protocols: list[str] = opt(["knn", "linear"], f"among {', '.join(PROTOCOLS)}")
    k: int = opt(200, "kNN: neighbours that vote")
    temperature: float = opt(0.07, "kNN: vote weight exp(similarity / temperature)")
    label_fractions: list[float] = opt([0.01, 0.1], "semisup: shares of the train labels used")
    voc_root: str | None = opt(None, "detection: a VOC-format folder or URI")
    out: str = opt("", "output URI of the metrics")
    overwrite: bool = opt(False, "replace a complete output at `out` (cached features are kept)")
    seed: int = opt(0, "seed of every protocol (held-out split, label subset, initialisation)")
    batch_size: int = opt(256, "images per forward pass when extracting features")
    actors: int | None = opt(None, "feature-extraction actors (default: one per GPU, else CPUs-1)")
    gpu_wait_s: float | None = opt(
        None,
        "GPUs short of `actors` (or none at all): ask the autoscaler and wait this long; "
        "none: $SEPP_GPU_WAIT_S or 0 (fail at once; run on CPUs where the cluster has no GPU)",
    )
    linear: LinearProbeConfig = field(
        default_factory=LinearProbeConfig, metadata={"help": "linear probe"}
    )
    semisup: FinetuneConfig = field(
        default_factory=FinetuneConfig, metadata={"help": "semi-supervised fine-tuning"}
    )
    detection: DetectionConfig = field(
        default_factory=DetectionConfig, metadata={"help": "VOC detection transfer"}
    )

    def validate(self) -> None:
        """Every setting and location, before any work (`sepp eval`)."""
        if not self.checkpoints:
            raise SeppError("eval needs at least one checkpoint URI (checkpoints=URI[,URI...])")
        if not self.out:
            raise SeppError("eval needs an output URI (out=...)")
        self.validate_settings()
        if self.needs_dataset() and not self.dataset:
            raise SeppError(f"protocols {self.protocols} need a dataset URI (dataset=...)")
        if "detection" in self.protocols and not self.voc_root:
            raise SeppError("protocol detection needs a VOC dataset (voc_root=...)")
        if len(set(self.checkpoints)) != len(self.checkpoints):
            raise SeppError("a checkpoint is listed twice in checkpoints")

    def validate_settings(self) -> None:
        """The settings alone, no location: what a pipeline or sweep checks up front, before
        the checkpoints it will evaluate exist."""
        unknown = sorted(set(self.protocols) - set(PROTOCOLS))
        if unknown or not self.protocols:
            raise SeppError(
                f"unknown protocol(s) {unknown or '(none given)'}: choose among {PROTOCOLS.names()}"
            )
        if "semisup" in self.protocols and not self.label_fractions:
            raise SeppError("protocol semisup needs label_fractions (e.g. 0.01,0.1)")
        bad = [f for f in self.label_fractions if not 0.0 < f <= 1.0]
        if "semisup" in self.protocols and bad:
            raise SeppError(f"label_fractions must lie in (0, 1], got {bad}: e.g. 0.01,0.1")
        if self.k < 1:
            raise SeppError(f"k (kNN neighbours) must be >= 1, got {self.k}")
        if not self.temperature > 0:
            raise SeppError(f"temperature (kNN) must be > 0, got {self.temperature}")
        if self.batch_size < 1:
            raise SeppError(f"batch_size must be >= 1, got {self.batch_size}")
        self.linear.validate()
        self.semisup.validate()
        self.detection.validate()

    def needs_dataset(self) -> bool:
        return bool({"knn", "linear", "semisup"} & set(self.protocols))


def short_names(uris: list[str]) -> list[str]:
    """The shortest path suffixes that tell the URIs apart (table row names)."""
    parts = [u.rstrip("/").split("/") for u in uris]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return list(uris)


def pretrain_dataset(manifest: dict[str, Any]) -> str | None:
    """The pretraining dataset URI a checkpoint's manifest records, if any."""
    for where in (manifest, manifest.get("config") or {}):
        d = where.get("dataset")
        if isinstance(d, dict) and d.get("uri"):
            return str(d["uri"])
        if isinstance(d, str) and d:
            return d
    return None


def _gather(futures: dict[Any, Any]) -> dict[Any, Any]:
    """ray.get every future; a SeppError raised in a task surfaces as itself."""
    from sepp_ray.ray_utils import ray_get

    return {key: ray_get(ref) for key, ref in futures.items()}


def _check_inputs(cfg: EvalConfig) -> tuple[list[dict[str, Any]], ImageDataset | None]:
    """Fail on any bad input before Ray work: checkpoints, splits, labels, the VOC root."""
    ckpts = []
    for uri in cfg.checkpoints:
        m = checkpoint_manifest(uri)
        _, meta, sha = load_backbone(uri)  # weights that do not fit raise here
        ckpts.append({"uri": uri, "sha256": sha, "backbone": asdict(meta), "manifest": m})
    ds = None
    if cfg.needs_dataset():
        ds = ImageDataset.open(cfg.dataset)
        why = ", ".join(p for p in cfg.protocols if p != "detection")
        check_split(ds, cfg.train_split, need_labels=True, why=why)
        check_split(ds, cfg.test_split, need_labels=True, why=why)
    if "semisup" in cfg.protocols and ds is not None:
        import numpy as np

        from sepp_ray.eval.semisup import balanced_subset

        t = ds.read_table(["label"], split=cfg.train_split)
        labels = t["label"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        for f in cfg.label_fractions:
            balanced_subset(labels, f, cfg.seed, ds.classes)  # a class left empty raises here
    if "detection" in cfg.protocols and cfg.voc_root:
        from sepp_ray.eval.voc import read_voc

        read_voc(cfg.voc_root, cfg.detection.train_split)
        read_voc(cfg.voc_root, cfg.detection.test_split)
    return ckpts, ds


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Run every protocol for every checkpoint; write metrics.json, metrics.md and the manifest."""
    import ray

    from sepp_ray.ray_utils import init_ray

    cfg.validate()
    cfg = replace(
        cfg,
        checkpoints=[absolute(c) for c in cfg.checkpoints],
        dataset=absolute(cfg.dataset),
        out=absolute(cfg.out),
        voc_root=absolute(cfg.voc_root) if cfg.voc_root else cfg.voc_root,
    )
    ckpts, ds = _check_inputs(cfg)
    init_ray()
    check_shared_storage(
        {
            **{f"checkpoints[{i}]": c for i, c in enumerate(cfg.checkpoints)},
            "dataset": cfg.dataset,
            "out": cfg.out,
            "voc_root": cfg.voc_root,
        }
    )
    gpus = stage_gpus(
        cfg.actors,
        gpu_wait(cfg.gpu_wait_s),
        what="evaluation actors (one GPU each)",
        fix="lower actors",
    )
    loc = begin_write(cfg.out, overwrite=cfg.overwrite, keep=(FEATURES,))

    def remote(fn: Callable[..., Any]) -> Any:
        return ray.remote(fn).options(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=0)

    num_classes = len(ds.classes) if ds is not None else 0
    split_pair = (cfg.train_split, cfg.test_split)
    feats: dict[int, str] = {}
    if any(PROTOCOLS.get(p).features for p in cfg.protocols):
        # every extraction first: the protocol tasks would compete with it for the CPUs
        for i, c in enumerate(ckpts):
            feats[i] = loc.child(FEATURES, c["sha256"][:16]).uri
            # our own cache: replaced when it does not match
            extract_features(
                c["uri"],
                cfg.dataset,
                list(split_pair),
                feats[i],
                batch_size=cfg.batch_size,
                actors=cfg.actors,
                overwrite=True,
            )
    remotes: dict[Callable[..., Any], Any] = {}  # one Ray remote function per task
    futures: dict[tuple[int, str, str], Any] = {}
    for i, c in enumerate(ckpts):
        for name in dict.fromkeys(cfg.protocols):
            for sub, task, args in PROTOCOLS.get(name).calls(cfg, c, feats.get(i, ""), num_classes):
                if task not in remotes:
                    remotes[task] = remote(task)
                futures[(i, name, sub)] = remotes[task].remote(*args)
    results = _gather(futures)
    metrics = _assemble(cfg, ckpts, ds, results)
    table = metrics_table(metrics)
    loc.write_bytes("metrics.json", json.dumps(metrics, indent=2).encode())
    loc.write_bytes("metrics.md", table.encode())
    finish_write(
        loc,
        {
            "kind": "eval",
            "protocols": list(cfg.protocols),
            "checkpoints": [{"uri": c["uri"], "sha256": c["sha256"]} for c in ckpts],
            "dataset": metrics["dataset"],
            "voc_root": cfg.voc_root,
            "gpus": gpus,
            "files": {"metrics": "metrics.json", "table": "metrics.md"},
            "config": _jsonable(asdict(cfg)),
        },
    )
    return metrics


def _assemble(
    cfg: EvalConfig,
    ckpts: list[dict[str, Any]],
    ds: ImageDataset | None,
    results: dict[tuple[int, str, str], Any],
) -> dict[str, Any]:
    dataset = None
    if ds is not None:
        dataset = {
            "uri": cfg.dataset,
            "fingerprint": ds.fingerprint,
            "train_split": cfg.train_split,
            "test_split": cfg.test_split,
            "classes": ds.classes,
        }
    rows = []
    for i, (c, name) in enumerate(zip(ckpts, short_names(cfg.checkpoints), strict=True)):
        pre = pretrain_dataset(c["manifest"])
        entry: dict[str, Any] = {
            "name": name,
            "uri": c["uri"],
            "sha256": c["sha256"],
            "backbone": c["backbone"],
            "pretrain_dataset": pre,
            "eval_dataset": cfg.dataset or None,
            "transfer": None if pre is None or not cfg.dataset else _differs(pre, cfg.dataset),
        }
        for (j, protocol, sub), res in sorted(results.items()):
            if j != i:
                continue
            if sub:
                entry.setdefault(protocol, {})[sub] = res
            else:
                entry[protocol] = res
        entry["headline"] = headline(entry)
        rows.append(entry)
    return {
        "dataset": dataset,
        "voc_root": cfg.voc_root,
        "protocols": list(cfg.protocols),
        "seed": cfg.seed,
        "checkpoints": rows,
    }


def _differs(a: str, b: str) -> bool:
    norm = [posixpath.normpath(x.rstrip("/").removeprefix("file://")) for x in (a, b)]
    return norm[0] != norm[1]


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(d, default=str)))


def read_metrics(uri: str) -> dict[str, Any]:
    """The metrics.json of a complete eval output."""
    from sepp_ray.storage import read_manifest

    m = read_manifest(uri)
    if m.get("kind") != "eval":
        raise SeppError(f"{uri} is a {m.get('kind')!r} output, not eval metrics")
    return dict(json.loads(Location(uri).read_bytes("metrics.json")))


def run_eval_command(c: EvalConfig) -> int:
    """`sepp eval`'s entry point."""
    run_eval(c)
    say(f"metrics: {c.out}/metrics.md and {c.out}/metrics.json")
    return 0
