"""Embedding at scale: image shards -> L2-normalised embeddings (Parquet) + manifest, on Ray Data.

An actor pool of ``Embedder``s (one GPU each where GPUs exist, CPU actors otherwise) runs over
the dataset's shards. Output rows: ``id``, ``label``, ``split``, ``embedding`` (fixed-size list
of float32). Labels ride along only so that pair precision can be measured later; they are
never used to choose pairs.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import asdict, replace
from typing import Any

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.data.infer import infer_to_parquet
from sepp_ray.errors import SeppError
from sepp_ray.mining.encoder import EncoderConfig, load_encoder
from sepp_ray.resources import gpu_wait, stage_gpus
from sepp_ray.shared_storage import check_shared_storage
from sepp_ray.storage import (
    absolute,
    begin_write,
    finish_write,
)

log = logging.getLogger(__name__)
EMB_DIR = "embeddings"


def embed(
    dataset_uri: str,
    out_uri: str,
    encoder: EncoderConfig,
    *,
    splits: list[str] | None = None,
    actors: int | None = None,
    overwrite: bool = False,
    rows_per_file: int = 100_000,
    gpu_wait_s: float | None = None,
) -> dict[str, Any]:
    """Embed the images of ``splits`` (all when None); returns the manifest written.

    ``gpu_wait_s``: how long to wait for the autoscaler's GPUs (``sepp_ray.resources``)."""

    from sepp_ray.ray_utils import init_ray

    dataset_uri, out_uri = absolute(dataset_uri), absolute(out_uri)
    if encoder.checkpoint:
        encoder = replace(encoder, checkpoint=absolute(encoder.checkpoint))
    ds = ImageDataset.open(dataset_uri)
    present = list(ds.manifest["splits"])
    chosen = present if not splits else splits
    unknown = sorted(set(chosen) - set(present))
    if unknown:
        raise SeppError(f"split(s) {unknown} not in {dataset_uri}; it has {present}")
    n_expected = sum(ds.manifest["splits"][s]["total"] for s in chosen)
    if n_expected == 0:
        raise SeppError(f"no images in splits {chosen} of {dataset_uri}: nothing to embed")
    _, meta, identity = load_encoder(encoder)  # fail on a bad checkpoint before any Ray work
    init_ray()
    check_shared_storage(
        {"dataset": dataset_uri, "out": out_uri, "encoder.checkpoint": encoder.checkpoint}
    )
    stage_gpus(
        actors, gpu_wait(gpu_wait_s), what="embedding actors (one GPU each)", fix="lower actors"
    )
    loc = begin_write(out_uri, overwrite=overwrite)
    from sepp_ray.mining.encoder import Embedder

    # files are the unit of key sharding in `sepp mine shard_keys=S`
    files, rows, n_actors, gpus = infer_to_parquet(
        ds,
        chosen,
        Embedder,
        (encoder,),
        encoder.batch_size,
        loc,
        EMB_DIR,
        actors=actors,
        rows_per_file=rows_per_file,
        decode_size=meta.image_size,
    )
    if sum(rows) != n_expected:
        raise SeppError(f"embedded {sum(rows)} images but expected {n_expected}: rerun")
    manifest = {
        "kind": "embeddings",
        "num_embeddings": int(sum(rows)),
        "dim": meta.feat_dim,
        "encoder": {"identity": identity, "config": asdict(encoder), "meta": asdict(meta)},
        "dataset": {
            "uri": dataset_uri,
            "fingerprint": ds.fingerprint,
            "classes": ds.classes,
        },
        "splits": chosen,
        "actors": n_actors,
        "gpus": gpus,
        "files": [
            {"path": posixpath.relpath(p, loc.path), "rows": r}
            for p, r in zip(files, rows, strict=True)
        ],
    }
    finish_write(loc, manifest)
    return manifest
