"""Online re-mining: a pretraining run mines its semantic pairs again with the encoder it is
training, every ``pairs.remine_every`` epochs.

SePP mines its pairs once, with a fixed sampler (arXiv 2306.16122); where the sampler is weak
(a new domain, the pipeline's bootstrap) the pairs are only as good as it is, while the model in
training improves every epoch. Round 1's pairs are the sampler's (``pairs.pairs``); before epoch
``(r - 1) x every`` the run writes round r's pairs at ``OUT/rounds/round-RRR`` as a complete pairs
result (the manifest of `sepp mine`, with precision where labels exist) and trains on them.

Where the work runs: the training workers embed their share of the split (from the split
they hold decoded on the resident plane; read in Ray tasks from Parquet on the streaming one),
with the momentum/teacher encoder where the method has one (``remine_encoder``), gather the
embeddings, and each searches its share of the anchors with the run's mining config (the first
pairs' manifest's: thresholds, K, m, seed, so every round searches from the same anchors and
precision compares like with like); `sepp_ray.train.remine_round` runs a round,
`sepp_ray.train.remine_targets` embeds and re-itemises each plane. A Ray Data actor pool between
training segments would restart Ray Train for every round and, on the resident plane, decode
the split again (`benchmarks/remine.py` measures both). The optimizer, the step count and the
learning-rate schedule go on untouched: only the items change, an epoch keeps the first round's
step count.

A round is written once, manifest last: a run that dies during one resumes from the checkpoint
saved at the round's first epoch (always saved) and mines the round again from the same weights,
or reads the complete round back; every rank trains on the pairs read back from storage.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from sepp_ray.errors import SeppError
from sepp_ray.storage import Location, read_manifest

if TYPE_CHECKING:
    from sepp_ray.mining.mine import MineConfig
    from sepp_ray.train.items import PairsConfig
    from sepp_ray.train.plan import Chunk

log = logging.getLogger(__name__)
ROUNDS_DIR = "rounds"
ROUND_FAILED = "round_failed.json"  # written by rank 0 when a round cannot be mined


@dataclass(frozen=True)
class RemineSpec:
    """A run's re-mining, resolved by the driver: every rank reads it from `WorkerConfig`.

    encoder: "momentum" or "online" (``auto`` resolved). mining: the first pairs' mining config.
    pairs: how pairs become items (the run's ``pairs`` config). first_pairs: round 1's URI
    (the sampler's pairs). Rounds count from 1; round r trains from epoch ``(r - 1) x every``.
    """

    every: int
    encoder: str
    mining: MineConfig
    pairs: PairsConfig
    first_pairs: str
    dataset: str
    split: str
    classes: list[str]
    seed: int  # the run's seed: groups of the item plan
    # streaming plane: the split's row groups (what its ranks embed) and the item-table bound
    image_chunks: list[Chunk] | None = None
    max_item_table_gb: float | None = None

    def round_of(self, epoch: int) -> int:
        """The round (from 1) whose pairs 0-based ``epoch`` trains on."""
        return epoch // self.every + 1

    def start_of(self, r: int) -> int:
        """The 0-based epoch round ``r`` starts at."""
        return (r - 1) * self.every


def round_uri(out_uri: str, r: int) -> str:
    return Location(out_uri).child(ROUNDS_DIR, f"round-{r:03d}").uri


def mining_config_of(pairs_uri: str) -> MineConfig:
    """The mining config the pairs at ``pairs_uri`` were mined with (their manifest's)."""
    from sepp_ray.mining.mine import MineConfig

    manifest = read_manifest(pairs_uri)
    if manifest.get("kind") != "pairs" or "config" not in manifest:
        raise SeppError(
            f"{pairs_uri} is not a pairs result of `sepp mine` (its manifest has no mining "
            "config): re-mining mines later rounds with the first pairs' config"
        )
    known = {f.name for f in fields(MineConfig)}
    cfg = MineConfig(**{k: v for k, v in manifest["config"].items() if k in known})
    cfg.validate()
    return cfg


def resolve_encoder(requested: str, momentum_attr: str | None) -> str:
    """``auto`` -> momentum where the method has a momentum encoder, else online."""
    if requested == "auto":
        return "momentum" if momentum_attr else "online"
    if requested == "momentum" and not momentum_attr:
        raise SeppError("remine_encoder=momentum: the method has no momentum encoder")
    return requested


def round_summary(uri: str, r: int, start_epoch: int) -> dict[str, Any]:
    """One line of the run manifest's ``rounds``: where the round's pairs are, how many, how
    precise (None without labels), and the encoder that mined them."""
    m = read_manifest(uri)
    precision = m.get("precision") or {}
    return {
        "round": r,
        "start_epoch": start_epoch,
        "pairs": uri,
        "num_pairs": int(m.get("num_pairs", 0)),
        "precision": precision.get("overall"),
        "encoder": m.get("encoder_from", "sampler"),
    }


def summarise_rounds(spec: RemineSpec, out_uri: str, epochs: int) -> list[dict[str, Any]]:
    """Every round of a finished run: round 1 (the sampler's pairs), then each re-mined one."""
    last = spec.round_of(epochs - 1)
    rows = [round_summary(spec.first_pairs, 1, 0)]
    rows += [round_summary(round_uri(out_uri, r), r, spec.start_of(r)) for r in range(2, last + 1)]
    return rows


def mining_dict(spec: RemineSpec) -> dict[str, Any]:
    return {"every": spec.every, "encoder": spec.encoder, "mining": asdict(spec.mining)}


def plan_remining(
    p: PairsConfig,
    method: str,
    where: tuple[str, str],
    classes: list[str],
    epochs: int,
    seed: int,
) -> RemineSpec | None:
    """The driver's side: the run's re-mining (``p``: its pairs config) resolved and checked
    against its plan (None when it mines once). ``where``: (dataset URI, split); ``epochs``:
    the plan's; ``seed``: the run's. The streaming plane's row groups are the driver's to add."""
    from sepp_ray.methods import method_class

    if p.remine_every is None:
        return None
    if p.remine_every >= epochs:
        raise SeppError(
            f"pairs.remine_every={p.remine_every} with a run of {epochs} epochs: no round "
            "would re-mine; lower remine_every"
        )
    assert p.pairs is not None  # PairsConfig.validate made sure
    return RemineSpec(
        every=p.remine_every,
        encoder=resolve_encoder(p.remine_encoder, method_class(method).momentum_attr),
        mining=mining_config_of(p.pairs),
        pairs=p,
        first_pairs=p.pairs,
        dataset=where[0],
        split=where[1],
        classes=list(classes),
        seed=seed,
    )


def check_round_failed(out_uri: str) -> None:
    """Raise the reason a round could not be mined, left by rank 0 (and clear it)."""
    import json

    loc = Location(out_uri)
    if not loc.exists(ROUND_FAILED):
        return
    failed = json.loads(loc.read_bytes(ROUND_FAILED))
    loc.fs.rm(loc.join(ROUND_FAILED))
    raise SeppError(
        f"re-mining round {failed['round']} failed: {failed['error']}. The checkpoint before "
        "it is kept; change the first pairs' mining thresholds or remine_encoder and run again"
    )
