"""Online re-mining: a pretraining run mines its semantic pairs again with the encoder it is
training, every ``pairs.remine_every`` epochs.

SePP mines its pairs once, with a fixed sampler (arXiv 2306.16122); where the sampler is weak
(a new domain, the pipeline's bootstrap) the pairs are only as good as it is, while the model in
training improves every epoch. Round 1's pairs are the sampler's (``pairs.pairs``); before epoch
``(r - 1) x every`` the run writes round r's pairs at ``OUT/rounds/round-RRR`` as a complete pairs
result (the manifest of `sepp mine`, with precision where labels exist) and trains on them.

Where the work runs: the training workers embed their share of the split they already hold
decoded (the resident plane), with the momentum/teacher encoder where the method has one
(``remine_encoder``), gather the embeddings, and each searches its share of the anchors with
the run's mining config (the first pairs' manifest's: thresholds, K, m, seed, so every round
searches from the same anchors and precision compares like with like). A Ray Data actor pool
between training segments would decode the split from Parquet again and restart Ray Train
for every round (`benchmarks/remine.py` measures both). The optimizer, the step count and the
learning-rate schedule go on untouched: only the items change, an epoch keeps the first round's
step count.

A round is written once, manifest last: a run that dies during one resumes from the checkpoint
saved at the round's first epoch (always saved) and mines the round again from the same weights,
or reads the complete round back; every rank trains on the pairs read back from storage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sepp_ray import dist
from sepp_ray.errors import SeppError
from sepp_ray.storage import Location, begin_write, finish_write, read_manifest

if TYPE_CHECKING:
    import pyarrow as pa

    from sepp_ray.methods.base import Method
    from sepp_ray.mining.mine import MineConfig, Mined
    from sepp_ray.train.items import PairsConfig
    from sepp_ray.train.resident import ResidentFeed

log = logging.getLogger(__name__)
ROUNDS_DIR = "rounds"
ROUND_FAILED = "round_failed.json"  # written by rank 0 when a round cannot be mined
EMBED_BATCH = 512


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


def encoder_of(method: Method, which: str) -> torch.nn.Module:
    """The backbone a round embeds with."""
    momentum = method.momentum_backbone_or_none()
    if which == "momentum":
        if momentum is None:
            raise SeppError(f"method {method.name} has no momentum encoder to re-mine with")
        return momentum
    return method.backbone


def square_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 B x 3 x H x W -> B x 3 x size x size: the central square of the shorter side,
    resized (as `sepp embed` and evaluation take raw images); unchanged when already so."""
    h, w = images.shape[-2:]
    if h == w == size:
        return images
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = images[..., top : top + s, left : left + s].float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def embed_share(
    feed: ResidentFeed,
    encoder: torch.nn.Module,
    norm: tuple[torch.Tensor, torch.Tensor],
    size: int,
    rank: int,
    world: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, L2-normalised fp32 features) of this rank's contiguous share of the split."""
    from sepp_ray.models.encode import encode

    n = int(feed.images.shape[0])
    lo, hi = (int(x[0]) if len(x) else 0 for x in _bounds(n, world, rank))
    feats = []
    for s in range(lo, hi, EMBED_BATCH):
        e = min(hi, s + EMBED_BATCH)
        pixels = square_uint8(feed.images[s:e].to(feed.device).permute(0, 3, 1, 2), size)
        f = encode(encoder, pixels, norm[0], norm[1], feed.device)
        feats.append(torch.nn.functional.normalize(f.float(), dim=1).cpu())
    dim = feats[0].shape[1] if feats else 0
    out = torch.cat(feats).numpy() if feats else np.zeros((0, dim), np.float32)
    if not np.isfinite(out).all():
        raise SeppError("the encoder in training produced NaN/inf features: no pairs to mine")
    return feed.host_ids[lo:hi], out


def _bounds(n: int, world: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    cuts = np.linspace(0, n, world + 1).astype(np.int64)
    return cuts[rank : rank + 1], cuts[rank + 1 : rank + 2]


def search_share(
    ids: np.ndarray, feats: np.ndarray, cfg: MineConfig, device: torch.device, rank: int, world: int
) -> tuple[np.ndarray, Any, Any]:
    """(all anchors, this rank's pairs, its anchors' nearest images below hi): the anchors
    are the first round's (same ids, same seed), cut in contiguous shares in anchor order, as
    `sepp mine` cuts them over its search actors, so the pairs equal one process' search."""
    from sepp_ray.mining.anchors import Vectors, choose_anchors
    from sepp_ray.mining.mine import NEIGHBOURS
    from sepp_ray.mining.search import auto_backend, build_searcher

    anchors = choose_anchors(ids, cfg.anchor_count(), cfg.seed)
    share = np.array_split(anchors, world)[rank]
    keys = Vectors(ids, feats)
    name = auto_backend() if cfg.backend == "auto" else cfg.backend
    options: dict[str, Any] = {"nprobe": cfg.nprobe} if name == "faiss-ivf" else {}
    if name == "torch":
        options["device"] = device  # this rank's GPU, not the node's first
    searcher = build_searcher(keys, name, **options)
    queries = keys.take(np.searchsorted(ids, share))
    pairs = searcher.search(queries, cfg.lo, cfg.hi, cfg.m, cfg.dup_eps, limit=cfg.max_pairs)
    near = searcher.search(queries, -1.0, cfg.hi, NEIGHBOURS, cfg.dup_eps)
    return anchors, pairs, near


def mine_round(
    spec: RemineSpec,
    feed: ResidentFeed,
    method: Method,
    norm: tuple[torch.Tensor, torch.Tensor],
    size: int,
) -> tuple[Mined, dict[str, float]]:
    """Collective: every rank embeds its share, the embeddings are gathered, every rank
    searches its share of the anchors and the pairs are gathered in anchor order."""
    from sepp_ray.mining.mine import Mined
    from sepp_ray.mining.search_base import Pairs, check_limit

    rank, world = dist.rank(), dist.world_size()
    t0 = time.perf_counter()
    encoder = encoder_of(method, spec.encoder)
    parts = _gathered(lambda: embed_share(feed, encoder, norm, size, rank, world))
    all_ids = np.concatenate([p[0] for p in parts])
    all_feats = np.concatenate([p[1] for p in parts])
    t1 = time.perf_counter()
    found = _gathered(
        lambda: search_share(all_ids, all_feats, spec.mining, feed.device, rank, world)
    )
    pairs = Pairs.concat([f[1] for f in found])
    try:  # each rank held a part; the whole may be over
        check_limit(len(pairs), spec.mining.max_pairs)
    except SeppError as e:
        raise RoundError(f"{e} (the re-mining round's pairs)") from e
    mined = Mined(found[0][0], pairs, Pairs.concat([f[2] for f in found]))
    times = {
        "embed_seconds": round(t1 - t0, 3),
        "search_seconds": round(time.perf_counter() - t1, 3),
    }
    return mined, times


class RoundError(SeppError):
    """A round could not be mined (raised on every rank alike)."""


def _gathered(work: Any) -> list[Any]:
    """Every rank's result of ``work()``, in rank order; a `SeppError` on any rank raises a
    `RoundError` on every rank (none is left waiting in a collective)."""
    try:
        value, error = work(), None
    except SeppError as e:
        value, error = None, str(e)
    results = dist.all_gather_objects((value, error))
    errors = [e for _, e in results if e]
    if errors:
        raise RoundError(errors[0])
    return [v for v, _ in results]


def write_round(
    spec: RemineSpec,
    out_uri: str,
    r: int,
    mined: Mined,
    labels_by_id: dict[int, int] | None,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Rank 0: round ``r``'s pairs as a complete pairs result, manifest last."""
    from sepp_ray.mining.mine import pairs_result

    loc = begin_write(round_uri(out_uri, r))  # a crashed round's leftovers are cleared
    body = pairs_result(
        loc,
        spec.mining,
        mined,
        n=int(info.pop("n")),
        labels_by_id=labels_by_id,
        classes=spec.classes,
    )
    manifest = {
        **body,
        "round": r,
        "start_epoch": spec.start_of(r),
        "dataset": {"uri": spec.dataset, "classes": spec.classes},
        "splits": [spec.split],
        "remined_from": spec.first_pairs,
        **info,
    }
    finish_write(loc, manifest)
    return manifest


def is_complete(uri: str) -> bool:
    try:
        read_manifest(uri)
    except SeppError:
        return False
    return True


def read_round(uri: str) -> pa.Table:
    from sepp_ray.mining.tables import read_pairs

    return read_pairs(uri, columns=["anchor_id", "positive_id"])


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


class Rounds:
    """One rank's re-mining: which round's items its resident feed holds, and the next round,
    mined (collectively) or read back when an earlier attempt completed it."""

    def __init__(
        self,
        spec: RemineSpec,
        out_uri: str,
        feed: ResidentFeed,
        method: Method,
        norm: tuple[torch.Tensor, torch.Tensor],
        size: int,
    ) -> None:
        self.spec, self.out, self.feed, self.method = spec, out_uri, feed, method
        self.norm, self.size = norm, size
        self.current = 1  # the plan's items: round 1, the sampler's pairs

    def before_epoch(self, epoch: int) -> bool:
        """Hold the items of ``epoch``'s round; False when the round could not be mined (rank
        0 left the reason where the driver looks)."""
        r = self.spec.round_of(epoch)
        if r == self.current:
            return True
        uri = round_uri(self.out, r)
        if not is_complete(uri):
            if epoch != self.spec.start_of(r):
                raise SeppError(
                    f"round {r}'s pairs ({uri}) are missing, and the run resumes inside that "
                    f"round (epoch {epoch}): they were deleted; pass overwrite=true to start over"
                )
            try:
                self._mine(r, epoch)
            except RoundError as e:
                if dist.rank() == 0:
                    Location(self.out).write_bytes(ROUND_FAILED, _error_json(r, str(e)))
                return False
        self.feed.set_items(self._items(read_round(uri)))
        self.current = r
        return True

    def _mine(self, r: int, epoch: int) -> None:
        """Mine round ``r`` from the weights of the checkpoint saved at ``epoch``."""
        mined, times = mine_round(self.spec, self.feed, self.method, self.norm, self.size)
        if dist.rank() == 0:
            labels = self.feed.labels_by_id()
            info = {
                "n": len(self.feed.host_ids),
                "encoder_from": self.spec.encoder,
                "encoder_checkpoint_epoch": epoch,
                "workers": dist.world_size(),
                **times,
            }
            m = write_round(self.spec, self.out, r, mined, labels, info)
            prec = (m.get("precision") or {}).get("overall")
            print(
                f"[sepp] re-mining round {r} (before epoch {epoch + 1}): {m['num_pairs']} pairs"
                + (f", precision {prec:.3f}" if prec is not None else ""),
                flush=True,
            )
        dist.barrier()  # every rank reads the round only once it is complete

    def _items(self, table: pa.Table) -> Any:
        from sepp_ray.train.items import plan_items, read_curated
        from sepp_ray.train.resident import ResidentItems

        p = self.spec.pairs
        curated = read_curated(p.curated) if p.curated else None
        plan = plan_items(table, curated, p, self.spec.seed)
        return ResidentItems.of(plan, p.max_positives)


def _error_json(r: int, error: str) -> bytes:
    import json

    return json.dumps({"round": r, "error": error}).encode()


def plan_remining(
    p: PairsConfig,
    method: str,
    where: tuple[str, str],
    classes: list[str],
    plane: str,
    epochs: int,
    seed: int,
) -> RemineSpec | None:
    """The driver's side: the run's re-mining (``p``: its pairs config) resolved and checked
    against its plan (None when it mines once). ``where``: (dataset URI, split); ``plane``: the
    data plane chosen; ``epochs``: the plan's; ``seed``: the run's."""
    from sepp_ray.methods import method_class

    if p.remine_every is None:
        return None
    if plane != "resident":
        raise SeppError(
            "pairs.remine_every cannot apply: the split streams from Parquet (it does not fit "
            "the resident plane: see the data plane's reason above), and re-mining rounds embed "
            "the split the training workers hold; raise resident_max_gb or re-mine offline "
            "between runs with `sepp mine encoder.checkpoint=...`"
        )
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
