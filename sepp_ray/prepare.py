"""The first stages that `sepp pipeline` and `sepp sweep` share: ingest, sampler, mining.

Each runs through ``Stages`` (content-hashed output folders, reused when complete) with the
same payloads as the pipeline, so both commands name (and reuse) identical stages alike.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from sepp_ray.data.ingest import ImageOptions
from sepp_ray.data.sources import SourceOptions
from sepp_ray.mining.encoder import EncoderConfig
from sepp_ray.mining.mine import MineConfig
from sepp_ray.pipeline import Stages, _complete, _pairs_identity
from sepp_ray.storage import read_manifest
from sepp_ray.train.driver import PretrainConfig
from sepp_ray.train.items import PairsConfig


def prepare_data(
    st: Stages, source: str, fmt: str, options: SourceOptions, images: ImageOptions
) -> tuple[str, dict[str, Any]]:
    """(dataset URI, its manifest): ``source`` itself when already ingested, else ingested."""
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import open_source

    if _complete(source) is not None and read_manifest(source).get("kind") == "images":
        return source, read_manifest(source)
    src = open_source(source, fmt, options)
    return st.run(
        "data",
        {"source": src.describe(), "fp": src.fingerprint(), "images": asdict(images)},
        lambda uri: ingest(src, uri, images, overwrite=True),
    )


def train_stage(
    st: Stages, name: str, base: PretrainConfig, data_uri: str, data_fp: Any, epochs: int
) -> tuple[str, dict[str, Any]]:
    """A plain (no pairs) pretraining run as a stage: the bootstrap sampler."""
    from sepp_ray.train.driver import pretrain

    pairs = PairsConfig(mode="none")
    cfg = replace(base, dataset=data_uri, out="", epochs=epochs, pairs=pairs, overwrite=False)
    payload = {
        "data": data_fp,
        "cfg": {k: v for k, v in asdict(cfg).items() if k not in ("out", "dataset")},
        "pairs_fp": _pairs_identity(pairs.pairs),
    }
    return st.run(name, payload, lambda uri: pretrain(replace(cfg, out=uri)))


def sampler_checkpoint(
    st: Stages,
    given: str | None,
    base: PretrainConfig,
    data_uri: str,
    data_fp: Any,
    bootstrap_epochs: int,
) -> str:
    """The checkpoint that mines: ``given``, or a bootstrapped plain run (arXiv 2306.16122)."""
    if given:
        return given
    _, boot = train_stage(st, "bootstrap", base, data_uri, data_fp, bootstrap_epochs)
    return str(boot["final_checkpoint"])


def embed_stage(
    st: Stages, data_uri: str, data_fp: Any, sampler: str, split: str
) -> tuple[str, dict[str, Any]]:
    """The sampler's embeddings of ``split``, once: every mining config searches these."""
    from sepp_ray.mining.embed import embed

    return st.run(
        "embeddings",
        {"data": data_fp, "sampler": read_manifest(sampler).get("sha256"), "splits": [split]},
        lambda uri: embed(
            data_uri, uri, EncoderConfig(checkpoint=sampler), splits=[split], overwrite=True
        ),
    )


def mine_stage(
    st: Stages,
    input_uri: str,
    data_fp: Any,
    sampler: str,
    mining: MineConfig,
    split: str,
) -> tuple[str, dict[str, Any]]:
    """Pairs mined with ``sampler`` as a stage: one folder per (data, sampler, mining config).
    ``input_uri``: the images (embedded inside the stage) or the sampler's embeddings."""
    from sepp_ray.mining.pipeline import mine_command

    sampler_sha = read_manifest(sampler).get("sha256")
    return st.run(
        "pairs",
        {"data": data_fp, "sampler": sampler_sha, "mining": asdict(mining)},
        lambda uri: mine_command(
            input_uri,
            uri,
            EncoderConfig(checkpoint=sampler),
            mining,
            splits=[split],
            actors=None,
            overwrite=True,
            config=asdict(mining),
        ),
    )
