"""The stages that `sepp pipeline` and `sepp sweep` share: ingest, plain or paired pretraining,
sampler, embedding, mining.

Each runs through ``Stages``: it writes to ``WORK/<stage>-<hash>``, where the hash covers the
stage's own config and the identity of its inputs (upstream fingerprints, weights' sha256). A
complete output is reused as is; an incomplete one (a crash) is continued: pretraining resumes
from its newest checkpoint. Both commands build the same payloads, so they name (and reuse)
identical stages alike.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sepp_ray.config import opt
from sepp_ray.console import headline, say
from sepp_ray.data.dataset import dataset_fingerprint
from sepp_ray.data.ingest import ImageOptions
from sepp_ray.data.sources import SourceOptions
from sepp_ray.errors import IncompleteError
from sepp_ray.mining.encoder import EncoderConfig
from sepp_ray.mining.mine import MineConfig
from sepp_ray.storage import read_manifest
from sepp_ray.train.driver import PretrainConfig
from sepp_ray.train.items import PairsConfig


@dataclass
class FlowConfig:
    """What `sepp pipeline` and `sepp sweep` share: the data, the sampler, the base runs."""

    source: str = opt("digits", "images to ingest (path, URI or built-in), or an ingested URI")
    format: str = opt("auto", "source format (see `sepp ingest --help`)")
    sampler_checkpoint: str | None = opt(None, "a checkpoint to mine with; none: bootstrap one")
    bootstrap_epochs: int = opt(10, "epochs of the plain bootstrap run that becomes the sampler")
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    mining: MineConfig = field(default_factory=MineConfig)
    equal_compute: bool = opt(
        True,
        "every run takes the plain run's optimizer steps (train images // batch x epochs): "
        "pair items then mean fewer epochs, not more steps",
    )
    images: ImageOptions = field(default_factory=ImageOptions)
    source_options: SourceOptions = field(default_factory=SourceOptions)


def stage_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :12
    ]


def complete(uri: str) -> dict[str, Any] | None:
    try:
        return read_manifest(uri)
    except IncompleteError:
        return None


class Stages:
    """Runs stages in order, timing each and reusing complete outputs."""

    def __init__(self, work: str) -> None:
        self.work = work.rstrip("/")
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []

    def run(
        self, name: str, payload: dict[str, Any], fn: Any, folder: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Run stage ``name`` into WORK/<folder or name>-<hash of payload>, or reuse it there.
        Stages that share a folder prefix share outputs when their payloads are equal."""
        uri = f"{self.work}/{folder or name}-{stage_hash(payload)}"
        done = complete(uri)
        if done is not None:
            say(f"[pipeline] {name}: reusing {uri} ({headline(done)})")
            self.reused.append(name)
            self.timings[name] = 0.0
            return uri, done
        say(f"[pipeline] {name}: running -> {uri}")
        t0 = time.perf_counter()
        fn(uri)
        self.timings[name] = round(time.perf_counter() - t0, 1)
        m = read_manifest(uri)
        say(f"[pipeline] {name}: done in {self.timings[name]:.0f} s ({headline(m)})")
        return uri, m


def pairs_identity(uri: str | None) -> Any:
    if not uri:
        return None
    m = read_manifest(uri)
    return {
        "n": m.get("num_pairs"),
        "encoder": m.get("encoder", {}).get("identity"),
        "lo": m.get("lo"),
        "hi": m.get("hi"),
        "k": m.get("k"),
    }


def prepare_data(
    st: Stages, source: str, fmt: str, options: SourceOptions, images: ImageOptions
) -> tuple[str, dict[str, Any]]:
    """(dataset URI, its manifest): ``source`` itself when already ingested, else ingested."""
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import open_source

    if complete(source) is not None and read_manifest(source).get("kind") == "images":
        return source, read_manifest(source)
    src = open_source(source, fmt, options)
    return st.run(
        "data",
        {"source": src.describe(), "fp": src.fingerprint(), "images": asdict(images)},
        lambda uri: ingest(src, uri, images, overwrite=True),
    )


def train_stage(
    st: Stages,
    name: str,
    base: PretrainConfig,
    data_uri: str,
    data_fp: Any,
    epochs: int,
    pairs: PairsConfig | None = None,
    budget_steps: int | None = None,
    folder: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """A pretraining run as a stage; plain (no pairs) unless ``pairs`` says otherwise.
    ``budget_steps``: the optimizer steps it takes (``sepp_ray.train.budget``); ``folder``:
    the output folder's prefix (default: ``name``)."""
    from sepp_ray.train.driver import pretrain

    pairs = pairs or PairsConfig(mode="none")
    cfg = replace(
        base,
        dataset=data_uri,
        out="",
        epochs=epochs,
        pairs=pairs,
        overwrite=False,
        budget_steps=budget_steps,
    )
    payload = {
        "data": data_fp,
        "cfg": {k: v for k, v in asdict(cfg).items() if k not in ("out", "dataset")},
        "pairs_fp": pairs_identity(pairs.pairs),
    }
    # plain runs share a folder: a bootstrap as long as the baseline is the baseline
    folder = "plain" if not pairs.pairs and not pairs.curated else folder or name
    return st.run(name, payload, lambda uri: pretrain(replace(cfg, out=uri)), folder)


def sampler_checkpoint(
    st: Stages,
    given: str | None,
    base: PretrainConfig,
    data_uri: str,
    data_fp: Any,
    bootstrap_epochs: int,
    budget_steps: int | None = None,
) -> str:
    """The checkpoint that mines: ``given``, or a bootstrapped plain run (arXiv 2306.16122).
    ``budget_steps``: as a plain run of that length gets it, so the two are one stage."""
    if given:
        return given
    _, boot = train_stage(
        st, "bootstrap", base, data_uri, data_fp, bootstrap_epochs, budget_steps=budget_steps
    )
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
    name: str = "pairs",
) -> tuple[str, dict[str, Any]]:
    """Pairs mined with ``sampler`` as a stage: one folder per (data, sampler, mining config).
    ``input_uri``: the images (embedded inside the stage) or the sampler's embeddings;
    ``name``: the stage's name in the timings (its folder is pairs-<hash> whatever the name)."""
    from sepp_ray.mining.command import mine_command

    sampler_sha = read_manifest(sampler).get("sha256")
    return st.run(
        name,
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
        folder="pairs",
    )


def eval_stage(
    st: Stages,
    ckpts: list[str],
    data_uri: str,
    data: dict[str, Any],
    protocols: list[str],
    knn_k: int,
) -> tuple[str | None, dict[str, dict[str, float]]]:
    """One ``sepp eval`` of ``ckpts`` on the test split, in one table (a reused stage on a
    rerun): its URI and each checkpoint's headline figures. kNN votes with ``knn_k``
    neighbours (at most the training split's size), the monitor's k during training.
    No checkpoints or no protocols: nothing runs, ``(None, {})``."""
    from sepp_ray.eval.command import EvalConfig, read_metrics, run_eval

    if not ckpts or not protocols:
        return None, {}
    k = min(knn_k, data["splits"].get("train", {}).get("total", knn_k))
    uri, _ = st.run(
        "eval",
        {
            "ckpts": [read_manifest(x).get("sha256") for x in ckpts],
            "data": dataset_fingerprint(data),
            "protocols": list(protocols),
            "k": k,
        },
        lambda out: run_eval(
            EvalConfig(
                checkpoints=list(ckpts),
                dataset=data_uri,
                protocols=list(protocols),
                out=out,
                overwrite=True,
                k=k,
            )
        ),
    )
    return uri, {e["uri"]: e["headline"] for e in read_metrics(uri)["checkpoints"]}
