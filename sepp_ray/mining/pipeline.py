"""`sepp mine` end to end: (embed, reusing a matching earlier embedding) -> search -> manifest.

The splits asked for are the splits mined: a split the input lacks is an error naming those it
has (mining all splits instead would draw positives from test images).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from typing import Any

from sepp_ray.errors import SeppError
from sepp_ray.mining.embed import EMB_DIR, embed
from sepp_ray.mining.encoder import EncoderConfig, load_encoder
from sepp_ray.mining.mine import MineConfig, check_embedded_splits, mine
from sepp_ray.storage import Location, absolute, begin_write, finish_write, read_manifest

log = logging.getLogger(__name__)


def _reusable(emb_uri: str, dataset_uri: str, identity: str, splits: list[str]) -> bool:
    """A complete embedding of the same dataset content, encoder and splits."""
    try:
        m = read_manifest(emb_uri)
        ds = read_manifest(dataset_uri)
    except SeppError:
        return False
    return (
        m.get("kind") == "embeddings"
        and m["encoder"]["identity"] == identity
        and m["dataset"]["uri"] == dataset_uri
        and m["dataset"]["fingerprint"] == ds.get("source", {}).get("fingerprint")
        and m["splits"] == splits
    )


def mine_command(
    input_uri: str,
    out_uri: str,
    encoder: EncoderConfig,
    cfg: MineConfig,
    *,
    splits: list[str],
    actors: int | None,
    overwrite: bool,
    config: dict[str, Any],
    rows_per_file: int = 100_000,
) -> dict[str, Any]:
    cfg.validate()  # bad thresholds etc. fail before anything is read or written
    if not splits:
        raise SeppError("mining needs at least one split (e.g. splits=[train])")
    input_uri, out_uri = absolute(input_uri), absolute(out_uri)
    if encoder.checkpoint:
        encoder = replace(encoder, checkpoint=absolute(encoder.checkpoint))
    kind = read_manifest(input_uri).get("kind")
    if kind == "embeddings":
        check_embedded_splits(input_uri, read_manifest(input_uri).get("splits"), splits)
        loc = begin_write(out_uri, overwrite=overwrite)
        emb_uri = input_uri
    elif kind == "images":
        emb_uri = Location(out_uri).child(EMB_DIR).uri
        _, _, identity = load_encoder(encoder)
        present = list(read_manifest(input_uri)["splits"])
        missing = [s for s in splits if s not in present]
        if missing:
            raise SeppError(
                f"split(s) {missing} are not in {input_uri}, which has {present}: "
                f"set splits to some of {present}"
            )
        chosen = list(splits)
        reuse = _reusable(emb_uri, input_uri, identity, chosen)
        loc = begin_write(out_uri, overwrite=overwrite, keep=(EMB_DIR,) if reuse else ())
        if reuse:
            log.info("reusing embeddings in %s (same dataset, encoder and splits)", emb_uri)
        else:
            embed(
                input_uri,
                emb_uri,
                encoder,
                splits=chosen,
                actors=actors,
                overwrite=True,
                rows_per_file=rows_per_file,
            )
    else:
        raise SeppError(f"{input_uri} is a {kind!r} output: give an image dataset or embeddings")
    body = mine(emb_uri, loc, cfg, splits)
    body["command_config"] = config
    body["encoder_config"] = asdict(encoder)
    finish_write(loc, body)
    return body
