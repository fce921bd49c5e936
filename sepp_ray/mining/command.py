"""The mining stage's commands: `sepp embed`, `sepp mine` end to end (embed, reusing a matching
earlier embedding -> search -> manifest) and `sepp pairs-report`.

The splits asked for are the splits mined: a split the input lacks is an error naming those it
has (mining all splits instead would draw positives from test images).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sepp_ray import config as cfg
from sepp_ray.config import opt
from sepp_ray.console import say
from sepp_ray.data.dataset import dataset_fingerprint
from sepp_ray.errors import SeppError
from sepp_ray.mining.embed import EMB_DIR, embed
from sepp_ray.mining.encoder import EncoderConfig, load_encoder
from sepp_ray.mining.mine import MineConfig, check_embedded_splits, mine
from sepp_ray.mining.report_stats import crowding_warning, per_anchor_line
from sepp_ray.storage import Location, absolute, begin_write, finish_write, read_manifest

log = logging.getLogger(__name__)


def _reusable(
    emb_uri: str, dataset_uri: str, ds: dict[str, Any], identity: str, splits: list[str]
) -> bool:
    """A complete embedding of the same dataset content (``ds``: its manifest), encoder and
    splits."""
    try:
        m = read_manifest(emb_uri)
    except SeppError:
        return False
    return (
        m.get("kind") == "embeddings"
        and m["encoder"]["identity"] == identity
        and m["dataset"]["uri"] == dataset_uri
        and m["dataset"]["fingerprint"] == dataset_fingerprint(ds)
        and m["splits"] == splits
    )


CURATION_DIR = "curation"  # `sepp curate`'s session (its decisions, curated.parquet)


def _begin_keeping_curation(out_uri: str, overwrite: bool, keep: tuple[str, ...] = ()) -> Location:
    """`begin_write` that never deletes a curation session of the pairs it replaces: hand-made
    decisions are worth more than the pairs; those on pairs mined again still apply."""
    loc = begin_write(out_uri, overwrite=overwrite, keep=(*keep, CURATION_DIR))
    if loc.exists(CURATION_DIR):
        say(
            f"kept the curation session in {loc.child(CURATION_DIR).uri}: its decisions on pairs "
            "mined again still apply, the others are ignored; export again (an earlier "
            "curated.parquet holds the old pairs)"
        )
    return loc


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
    given = read_manifest(input_uri)  # read once: the kind, splits and counts all come from it
    kind = given.get("kind")
    if kind == "embeddings":
        check_embedded_splits(input_uri, given.get("splits"), splits)
        loc = _begin_keeping_curation(out_uri, overwrite)
        emb_uri = input_uri
    elif kind == "images":
        emb_uri = Location(out_uri).child(EMB_DIR).uri
        present = given["splits"]
        missing = [s for s in splits if s not in present]
        if missing:
            raise SeppError(
                f"split(s) {missing} are not in {input_uri}, which has {list(present)}: "
                f"set splits to some of {list(present)}"
            )
        chosen = list(splits)
        n = sum(int(present[s].get("total", 0)) for s in chosen)
        k = cfg.anchor_count()
        if isinstance(k, int) and k > n:  # known from the manifest: refuse before embedding
            raise SeppError(
                f"mining.k={k} anchors exceeds the {n} images of split(s) {chosen}: "
                "lower K or pass a fraction (e.g. 0.05)"
            )
        _, _, identity = load_encoder(encoder)
        reuse = _reusable(emb_uri, input_uri, given, identity, chosen)
        loc = _begin_keeping_curation(out_uri, overwrite, (EMB_DIR,) if reuse else ())
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
    say(f"[mine] {per_anchor_line(body)}")
    crowded = crowding_warning(body)
    if crowded:  # beside a zero-pairs warning there is none: one or the other
        body["warning"] = crowded
        log.warning(crowded)
    body["command_config"] = config
    body["encoder_config"] = asdict(encoder)
    finish_write(loc, body)
    return body


@dataclass
class EmbedConfig:
    dataset: str = opt("", "an image dataset URI (the output of `sepp ingest`)")
    out: str = opt("", "output URI of the embeddings")
    splits: list[str] = opt([], "splits to embed, comma-separated (default: all)")
    actors: int | None = opt(None, "embedding actors (default: one per GPU, else up to 4 CPU)")
    rows_per_file: int = opt(100_000, "embeddings per Parquet file (the unit of key sharding)")
    overwrite: bool = opt(False, "replace a complete output already at `out`")
    encoder: EncoderConfig = field(default_factory=EncoderConfig)


@dataclass
class MineCommandConfig:
    input: str = opt(
        "",
        "an image dataset (embedded first, into OUT/embeddings) or an "
        "embeddings location (the output of `sepp embed`)",
    )
    out: str = opt("", "output URI of the pairs")
    splits: list[str] = opt(["train"], "splits to mine when the input is an image dataset")
    actors: int | None = opt(None, "embedding actors (default: one per GPU, else up to 4 CPU)")
    rows_per_file: int = opt(100_000, "embeddings per Parquet file (the unit of key sharding)")
    overwrite: bool = opt(False, "replace a complete output already at `out`")
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    mining: MineConfig = field(default_factory=MineConfig)


@dataclass
class PairsReportConfig:
    pairs: str = opt("", "a pairs location (the output of `sepp mine`)")
    out: str | None = opt(None, "where the PNGs and report.md go (default: ./runs/reports/<name>)")
    rows: int = opt(8, "anchors shown in the grid")
    per_row: int = opt(4, "positives shown per anchor")


def run_embed(c: EmbedConfig) -> int:
    if not c.dataset or not c.out:
        raise SeppError("embed needs DATASET and OUT (see `sepp embed --help`)")
    m = embed(
        c.dataset,
        c.out,
        c.encoder,
        splits=c.splits or None,
        actors=c.actors,
        overwrite=c.overwrite,
        rows_per_file=c.rows_per_file,
    )
    say(
        f"embedded {m['num_embeddings']} images ({m['dim']}-d, {m['encoder']['identity']}) "
        f"into {c.out}"
    )
    return 0


def run_mine(c: MineCommandConfig) -> int:
    if not c.input or not c.out:
        raise SeppError("mine needs INPUT and OUT (see `sepp mine --help`)")
    m = mine_command(
        c.input,
        c.out,
        c.encoder,
        c.mining,
        splits=c.splits,
        actors=c.actors,
        overwrite=c.overwrite,
        config=cfg.to_dict(c),
        rows_per_file=c.rows_per_file,
    )
    prec = (m.get("precision") or {}).get("overall")
    say(
        f"mined {m['num_pairs']} pairs for {m['anchors_with_positive']} of {m['k']} anchors "
        f"(N={m['n']}, [{m['lo']}, {m['hi']}]"
        + (f", pair precision {prec:.3f}" if prec is not None else "")
        + f") into {c.out}"
    )
    return 0


def run_pairs_report(c: PairsReportConfig) -> int:
    from sepp_ray.mining.pairs_report import write_report

    if not c.pairs:
        raise SeppError("pairs-report needs a pairs URI (see `sepp pairs-report --help`)")
    name = os.path.basename(c.pairs.rstrip("/")) or "pairs"
    out = c.out or os.path.join("runs", "reports", name)
    for path in write_report(c.pairs, out, rows=c.rows, per_row=c.per_row):
        say(path)
    return 0
