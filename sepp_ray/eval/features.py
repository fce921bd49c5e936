"""Frozen-backbone features of dataset splits, cached as Parquet with a manifest.

kNN and the linear probe (and their transfer variants) read features, not images: extracting
them is the only costly step, so it runs once per (checkpoint, dataset, splits) in one pass of a
Ray Data actor pool (one GPU per actor where GPUs exist) and is reused while the checkpoint's
weights, the dataset and the splits are unchanged. Preprocessing is the standard evaluation
one: resize to the backbone's input size, normalise; no augmentation. Features are the
backbone's pooled output, un-normalised: kNN normalises them, the linear probe standardises them.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.data.decode import decode_batch
from sepp_ray.data.infer import infer_to_parquet
from sepp_ray.errors import SeppError
from sepp_ray.models.checkpoint import BackboneMeta, checkpoint_manifest, load_backbone
from sepp_ray.models.encode import encode
from sepp_ray.storage import Location, begin_write, finish_write, read_manifest

log = logging.getLogger(__name__)
FEATURES_DIR = "features"
# bump when preprocessing changes, so old caches are not reused
PREPROCESS_VERSION = 2  # 2: shorter side + central square (was a squash to a square)


@dataclass(frozen=True)
class Features:
    """Features of one split, sorted by image id."""

    ids: np.ndarray  # N int64
    labels: np.ndarray  # N int64, -1 where unlabeled
    feats: np.ndarray  # N x D float32

    def labeled(self) -> Features:
        keep = self.labels >= 0
        return Features(self.ids[keep], self.labels[keep], self.feats[keep])


def check_split(ds: ImageDataset, split: str, need_labels: bool, why: str = "") -> None:
    """SeppError when ``split`` is missing, empty or (if labels are needed) unlabeled."""
    splits = ds.manifest.get("splits", {})
    if split not in splits:
        raise SeppError(
            f"split {split!r} is not in {ds.uri}; it has {sorted(splits)}: choose one of those"
        )
    if int(splits[split]["total"]) == 0:
        raise SeppError(f"split {split!r} of {ds.uri} holds no image")
    if need_labels and int(splits[split].get("labeled", 0)) == 0:
        raise SeppError(
            f"split {split!r} of {ds.uri} has no labels, but {why or 'this protocol'} needs "
            "labeled images: choose a labeled split or ingest a labeled dataset"
        )


class FeatureExtractor:
    """Ray Data callable class: {id, image, label} batches -> {id, label, feature}.

    ``__init__`` loads the checkpoint once per actor; ``__call__`` is a pure batch function.
    """

    def __init__(self, checkpoint_uri: str, device: str | None = None) -> None:
        model, self.meta, self.sha256 = load_backbone(checkpoint_uri)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.mean = torch.tensor(self.meta.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.meta.std, device=self.device).view(1, 3, 1, 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 B x 3 x S x S -> fp32 B x D on CPU."""
        f = encode(self.model, images, self.mean, self.std, self.device)
        if not torch.isfinite(f).all():
            raise SeppError("the backbone produced NaN/inf features: its weights are broken")
        return f.cpu()

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = decode_batch(batch, self.meta.image_size)
        f = self.features(images).numpy()  # f: B x D
        feature = pa.FixedSizeListArray.from_arrays(
            pa.array(f.reshape(-1), pa.float32()), f.shape[1]
        )
        cols = {"id": batch.column("id"), "label": batch.column("label")}
        if "split" in batch.column_names:
            cols["split"] = batch.column("split")
        return pa.table({**cols, "feature": feature})


def extract_features_local(
    checkpoint_uri: str, dataset_uri: str, split: str, batch_size: int = 256
) -> Features:
    """In-process extraction, no Ray, no cache: for small data and tests."""
    ds = ImageDataset.open(dataset_uri)
    check_split(ds, split, need_labels=False)
    table = ds.read_table(["id", "image", "label"], split=split)
    ex = FeatureExtractor(checkpoint_uri)
    parts = [ex(table.slice(i, batch_size)) for i in range(0, table.num_rows, batch_size)]
    return _to_features(pa.concat_tables(parts), ex.meta.feat_dim)


def _to_features(t: pa.Table, dim: int) -> Features:
    t = t.sort_by("id")
    feats = t["feature"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    labels = t["label"].fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return Features(
        t["id"].to_numpy().astype(np.int64),
        labels,
        np.asarray(feats, dtype=np.float32).reshape(-1, dim),
    )


def cache_key(
    sha256: str, meta: BackboneMeta, fingerprint: str, splits: list[str]
) -> dict[str, Any]:
    """What the features depend on, in the JSON form the manifest stores."""
    key = {
        "checkpoint_sha256": sha256,
        "backbone": asdict(meta),
        "dataset_fingerprint": fingerprint,
        "splits": sorted(splits),
        "preprocess_version": PREPROCESS_VERSION,
    }
    return dict(json.loads(json.dumps(key)))


def extract_features(
    checkpoint_uri: str,
    dataset_uri: str,
    splits: list[str],
    out_uri: str,
    *,
    batch_size: int = 256,
    actors: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Features of ``splits`` at ``out_uri`` (kind "features"), in one pass; returns the manifest.

    A complete output with the same checkpoint weights, backbone meta, dataset content and
    splits is reused as is. Another complete output there is replaced only when ``overwrite``.
    """

    from sepp_ray.ray_utils import init_ray

    ds = ImageDataset.open(dataset_uri)
    splits = sorted(set(splits))
    if not splits:
        raise SeppError("name at least one split to extract features of")
    for split in splits:
        check_split(ds, split, need_labels=False)
    m = checkpoint_manifest(checkpoint_uri)
    _, meta, sha = load_backbone(checkpoint_uri)  # fails on weights that do not fit, before Ray
    key = cache_key(sha, meta, ds.fingerprint, splits)
    if Location(out_uri).exists("manifest.json"):
        old = read_manifest(out_uri)
        if old.get("kind") == "features" and old.get("key") == key:
            log.info("reusing cached features at %s", out_uri)
            return old
    loc = begin_write(out_uri, overwrite=overwrite)
    init_ray()
    files, rows, n_actors, gpus = infer_to_parquet(
        ds,
        splits,
        FeatureExtractor,
        (checkpoint_uri,),
        batch_size,
        loc,
        FEATURES_DIR,
        actors=actors,
        decode_size=int(read_manifest(checkpoint_uri)["backbone"]["image_size"]),
    )
    expected = {s: int(ds.manifest["splits"][s]["total"]) for s in splits}
    if sum(rows) != sum(expected.values()):
        raise SeppError(
            f"extracted {sum(rows)} features but splits {expected} hold "
            f"{sum(expected.values())} images: rerun"
        )
    manifest = {
        "kind": "features",
        "key": key,
        "checkpoint": {"uri": checkpoint_uri, "sha256": sha, "name": m["backbone"]["name"]},
        "dataset": {"uri": dataset_uri, "classes": ds.classes},
        "splits": expected,
        "num_features": int(sum(rows)),
        "dim": meta.feat_dim,
        "actors": n_actors,
        "gpus": gpus,
        "files": [
            {"path": posixpath.relpath(p, loc.path), "rows": r}
            for p, r in zip(files, rows, strict=True)
        ],
    }
    finish_write(loc, manifest)
    return manifest


def load_features(uri: str, split: str) -> Features:
    """One split's rows of a features location, sorted by id."""
    m = read_manifest(uri)
    if m.get("kind") != "features":
        raise SeppError(f"{uri} is a {m.get('kind')!r} output, not features")
    if split not in m["splits"]:
        raise SeppError(f"{uri} holds features of splits {sorted(m['splits'])}, not {split!r}")
    loc = Location(uri)
    tables = []
    for f in m["files"]:
        with loc.fs.open(loc.join(f["path"]), "rb") as fh:
            t = pq.read_table(fh, columns=["id", "label", "split", "feature"])
        tables.append(t.filter(pc.equal(t["split"], split)))
    if not tables:
        raise SeppError(f"{uri} lists no feature files")
    return _to_features(pa.concat_tables(tables), int(m["dim"]))
