"""`sepp mine`: choose anchors, search all embeddings on Ray actors, write pairs + manifest.

Two distribution modes (arXiv 2306.16122 mines once, offline, so either is a one-shot job):
- replicated keys (default): every worker holds all N embeddings and searches its share of the
  anchors; results are concatenated in anchor order;
- sharded keys (``shard_keys=S``): worker s holds only key shard s and searches every anchor;
  per-shard results are merged. For key sets larger than one worker's memory.
Both give the same pairs as one process (same anchors, same tie-break), on any cluster shape.

As in the paper, K = 5% of the images (seeded) are anchors and every image whose similarity to
an anchor lies in [lo, hi] is a positive (``m`` optionally caps them per anchor). ``max_pairs``
is a safety cap, not a sampling rule: a window too wide for the encoder (e.g. a randomly
initialised one, where most similarities crowd near 1) would otherwise yield K x N pairs; it is
an error, raised while the search runs, that names the fixes.

A second search per anchor, with the lower threshold opened to -1, keeps its
``NEIGHBOURS`` nearest images below ``hi``: the nearest-neighbour similarity histogram, the
pair-precision-versus-threshold curve below ``lo``, and the zero-pairs warning read it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sepp_ray.config import opt
from sepp_ray.errors import SeppError
from sepp_ray.mining.anchors import Vectors, choose_anchors, validate_thresholds
from sepp_ray.mining.report_stats import pair_statistics, positives_per_anchor
from sepp_ray.mining.search import (
    KeySearcher,
    Pairs,
    build_searcher,
    check_backend,
    check_limit,
    merge_shard_results,
)
from sepp_ray.mining.tables import embedding_ids, embedding_labels, load_embeddings
from sepp_ray.resources import gpu_wait, stage_gpus
from sepp_ray.shared_storage import check_shared_storage
from sepp_ray.storage import Location, read_manifest

log = logging.getLogger(__name__)
PAIRS_DIR = "pairs"
CANDIDATES_DIR = "candidates"
NEIGHBOURS = 10  # nearest images below hi kept per anchor for the diagnostics


@dataclass(frozen=True)
class MineConfig:
    """How anchors are chosen and positives accepted."""

    lo: float = opt(0.96, "lower cosine threshold, inclusive (the papers' 0.96)")
    hi: float = opt(0.99, "upper cosine threshold, inclusive (the papers' 0.99)")
    k: float = opt(0.05, "anchors: a fraction of the images in (0, 1] (the paper's 5%), or a count")
    m: int | None = opt(
        None, "cap on positives per anchor, most similar first; null: all in [lo, hi] (the paper)"
    )
    max_pairs: int | None = opt(
        20_000_000, "safety cap: more pairs is an error (raise lo, lower k or set m); null: off"
    )
    seed: int = opt(0, "seed of the anchor choice")
    backend: str = opt("auto", "search backend: auto, torch, faiss-flat, faiss-ivf, numpy")
    actors: int | None = opt(None, "search actors (default: one per GPU, else 1)")
    workers: int | None = opt(
        None, "the former name of `actors` (accepted; `workers` is pretraining's word)"
    )
    shard_keys: int = opt(0, "0: every actor holds all keys; S > 0: S key shards, merged")
    dup_eps: float = opt(1e-4, "similarity >= 1 - dup_eps marks an exact duplicate (excluded)")
    nprobe: int = opt(16, "faiss-ivf: inverted lists visited per query")

    def validate(self) -> None:
        """Every value checkable without the data, so `sepp mine` fails before embedding."""
        validate_thresholds(self.lo, self.hi)
        k = self.k
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k):
            raise SeppError(f"k={k!r} (K, the anchors) must be a fraction in (0, 1] or a count")
        if k <= 0 or (k > 1 and k != int(k)):
            raise SeppError(
                f"k={k} (K, the anchors) must be a fraction of the images in (0, 1] (e.g. 0.05) "
                "or a whole count > 1 (e.g. 500)"
            )
        if self.m is not None and (isinstance(self.m, bool) or self.m < 1):
            raise SeppError(
                f"m={self.m} must be >= 1 (the most positives per anchor) or null (all of them)"
            )
        check_backend(self.backend)
        if not 0.0 <= self.dup_eps < 1.0:
            raise SeppError(f"dup_eps={self.dup_eps} must lie in [0, 1); the default is 1e-4")
        if self.nprobe < 1:
            raise SeppError(f"nprobe={self.nprobe} must be >= 1 (faiss-ivf lists per query)")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise SeppError(f"max_pairs={self.max_pairs} must be >= 1, or null to turn it off")
        if self.shard_keys < 0:
            raise SeppError(f"shard_keys={self.shard_keys} must be >= 0")
        if self.workers is not None and self.actors not in (None, self.workers):
            raise SeppError(
                f"mining.workers={self.workers} and mining.actors={self.actors} disagree: "
                "set actors only (workers is its former name)"
            )
        if self.search_actors is not None and self.search_actors < 1:
            raise SeppError(f"actors={self.search_actors} must be >= 1")

    @property
    def search_actors(self) -> int | None:
        """`actors`, or its former name `workers` in an older config."""
        return self.actors if self.actors is not None else self.workers

    def anchor_count(self) -> int | float:
        return int(self.k) if self.k > 1 else float(self.k)


def search_window(searcher: KeySearcher, queries: Vectors, cfg: MineConfig) -> tuple[Pairs, Pairs]:
    """The pairs of ``queries`` (in [lo, hi], at most m each, the run refused past max_pairs)
    and each one's ``NEIGHBOURS`` nearest images below hi (the diagnostics' candidates)."""
    pairs = searcher.search(queries, cfg.lo, cfg.hi, cfg.m, cfg.dup_eps, limit=cfg.max_pairs)
    near = searcher.search(queries, -1.0, cfg.hi, NEIGHBOURS, cfg.dup_eps)
    return pairs, near


class SearchWorker:
    """A Ray actor holding keys (all of them, or one shard) for repeated searches."""

    def __init__(
        self, emb_uri: str, backend: str, files: list[int] | None, options: dict[str, Any]
    ) -> None:
        import ray

        self.keys, _ = load_embeddings(emb_uri, files)
        self.searcher = build_searcher(self.keys, backend, **options)
        self.node = ray.get_runtime_context().get_node_id()

    def search(
        self, anchor_ids: np.ndarray, anchor_vecs: np.ndarray | None, cfg: MineConfig
    ) -> tuple[Pairs, Pairs, dict[str, Any]]:
        """The pairs (in-window, capped by m) and each anchor's nearest images below hi."""
        from sepp_ray.mining.anchors import Vectors

        t0 = time.perf_counter()
        if anchor_vecs is None:
            rows = np.searchsorted(self.keys.ids, anchor_ids)
            queries = self.keys.take(rows)
        else:
            queries = Vectors(anchor_ids, anchor_vecs)
        pairs, near = search_window(self.searcher, queries, cfg)
        info = {
            "node": self.node,
            "anchors": int(len(anchor_ids)),
            "keys": int(len(self.keys)),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return pairs, near, info


# a dead search actor, told as what happened and what to change
_ACTOR_LOST = ("a search actor", "Give the actors more memory or use shard_keys to split the keys")


def _write_pairs(loc: Location, name: str, pairs: Pairs) -> str:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(pairs.to_dict()), buf)
    rel = f"{name}/part-00000.parquet"
    loc.write_bytes(rel, buf.getvalue())
    return rel


def run_search(
    emb_uri: str, cfg: MineConfig, splits: list[str] | None = None
) -> tuple[np.ndarray, Pairs, Pairs, list[dict[str, Any]]]:
    """Anchors, pairs, each anchor's nearest images below hi, and per-worker info.

    ``splits``: those the caller means to mine; embeddings of other splits are an error.
    """
    import ray

    from sepp_ray.ray_utils import init_ray, ray_get

    manifest = read_manifest(emb_uri)
    if manifest.get("kind") != "embeddings":
        raise SeppError(f"{emb_uri} is a {manifest.get('kind')!r} output, not embeddings")
    if splits is not None:
        check_embedded_splits(emb_uri, manifest.get("splits"), splits)
    n = int(manifest["num_embeddings"])
    if n == 0:
        raise SeppError(f"{emb_uri} holds no embeddings: the dataset is empty")
    ids = embedding_ids(emb_uri)
    anchors = choose_anchors(ids, cfg.anchor_count(), cfg.seed)
    init_ray()
    check_shared_storage({"embeddings": emb_uri})
    gpus = stage_gpus(
        min(cfg.shard_keys, len(manifest["files"])) if cfg.shard_keys else cfg.search_actors,
        gpu_wait(),
        what="search actors (one GPU each)",
        fix="lower mining.actors or mining.shard_keys",
    )
    options: dict[str, Any] = {"nprobe": cfg.nprobe} if cfg.backend == "faiss-ivf" else {}
    cpus = float(ray.cluster_resources().get("CPU", 1))

    def actor_cls(n_actors: int) -> Any:
        # On a CPU cluster smaller than the actor count, share CPUs rather than wait forever
        # for actors that can never be placed.
        share = 1.0 if gpus else min(1.0, cpus / n_actors)
        return ray.remote(SearchWorker).options(num_gpus=1 if gpus else 0, num_cpus=share)

    n_files = len(manifest["files"])
    if cfg.shard_keys:
        shards = min(cfg.shard_keys, n_files)
        if shards < cfg.shard_keys:
            log.warning(
                "shard_keys=%d but only %d embedding files: using %d shards",
                cfg.shard_keys,
                n_files,
                shards,
            )
        workers = [
            actor_cls(shards).remote(emb_uri, cfg.backend, list(range(s, n_files, shards)), options)
            for s in range(shards)
        ]
        anchor_vecs, _ = load_embeddings(emb_uri, ids=anchors)
        vec_ref = ray.put(anchor_vecs.numpy())
        futures = [w.search.remote(anchors, vec_ref, cfg) for w in workers]
        results = ray_get(futures, lost=_ACTOR_LOST)
        pairs = merge_shard_results([r[0] for r in results], cfg.m, anchors)
        near = merge_shard_results([r[1] for r in results], NEIGHBOURS, anchors)
    else:
        n_workers = min(cfg.search_actors or max(1, gpus), len(anchors))
        workers = [
            actor_cls(n_workers).remote(emb_uri, cfg.backend, None, options)
            for _ in range(n_workers)
        ]
        chunks = np.array_split(anchors, n_workers)
        futures = [w.search.remote(c, None, cfg) for w, c in zip(workers, chunks, strict=True)]
        results = ray_get(futures, lost=_ACTOR_LOST)
        pairs = Pairs.concat([r[0] for r in results])
        near = Pairs.concat([r[1] for r in results])
    for w in workers:
        ray.kill(w)
    check_limit(len(pairs), cfg.max_pairs)  # each worker held a part; the whole may be over
    return anchors, pairs, near, [r[2] for r in results]


def check_embedded_splits(emb_uri: str, present: list[str] | None, wanted: list[str]) -> None:
    """The embeddings must hold exactly the splits asked for: a missing one would silently mine
    another split, an extra one would take positives (and anchors) from it."""
    if not present:
        raise SeppError(
            f"{emb_uri} records no splits: re-embed it with `sepp embed ... splits=[{wanted[0]}]`"
        )
    missing = [s for s in wanted if s not in present]
    if missing:
        raise SeppError(
            f"split(s) {missing} are not in the embeddings at {emb_uri}, which hold {present}: "
            "choose among those splits or embed the ones you want"
        )
    extra = [s for s in present if s not in wanted]
    if extra:
        raise SeppError(
            f"the embeddings at {emb_uri} also hold split(s) {extra} (they hold {present}, mining "
            f"asks for {wanted}): embed only {wanted}, or ask for all of {present}"
        )


def below_lo(near: Pairs, lo: float) -> Pairs:
    """Nearest images under ``lo``: added to the pairs, they extend the threshold curve down."""
    keep = near.similarity < np.float32(lo)
    return Pairs(
        near.anchor_id[keep], near.positive_id[keep], near.similarity[keep], near.rank[keep]
    )


def mine(
    emb_uri: str, loc: Location, cfg: MineConfig, splits: list[str] | None = None
) -> dict[str, Any]:
    """Search and write pairs into the claimed location ``loc``; returns the manifest body
    (the caller adds its own fields and writes the manifest)."""
    from sepp_ray.ray_utils import init_ray

    cfg.validate()
    init_ray()
    check_shared_storage({"embeddings": emb_uri, "out": loc.uri})
    t0 = time.perf_counter()
    anchors, pairs, near, workers = run_search(emb_uri, cfg, splits)
    seconds = time.perf_counter() - t0
    emb_manifest = read_manifest(emb_uri)
    body = pairs_result(
        loc,
        cfg,
        Mined(anchors, pairs, near),
        n=int(emb_manifest["num_embeddings"]),
        labels_by_id=embedding_labels(emb_uri),
        classes=emb_manifest["dataset"].get("classes", []),
    )
    return {
        **body,
        "encoder": emb_manifest["encoder"],
        "embeddings": emb_uri,
        "dataset": emb_manifest["dataset"],
        "splits": emb_manifest.get("splits"),
        "workers": workers,
        "search_seconds": round(seconds, 3),
    }


@dataclass(frozen=True)
class Mined:
    """What one search found: the anchors, their pairs in [lo, hi] and each anchor's nearest
    images below hi (the diagnostics' candidates)."""

    anchors: np.ndarray
    pairs: Pairs
    near: Pairs


def pairs_result(
    loc: Location,
    cfg: MineConfig,
    mined: Mined,
    *,
    n: int,
    labels_by_id: dict[int, int] | None,
    classes: list[str],
) -> dict[str, Any]:
    """Write the pairs and candidates of a search into ``loc`` and return the body of their
    manifest: counts, statistics and precision where labels exist (`sepp mine` and a
    pretraining run's re-mining rounds write the same result)."""
    anchors, pairs, near = mined.anchors, mined.pairs, mined.near
    # rank 1 of this union is each anchor's nearest image below hi; at or above lo it is the pairs
    seen = Pairs.concat([pairs, below_lo(near, cfg.lo)])
    stats = pair_statistics(pairs, seen, anchors, cfg.lo, cfg.hi, labels_by_id, classes)
    files = {
        "pairs": _write_pairs(loc, PAIRS_DIR, pairs),
        "candidates": _write_pairs(loc, CANDIDATES_DIR, near),
    }
    per_anchor = np.bincount(np.unique(pairs.anchor_id, return_inverse=True)[1])
    body: dict[str, Any] = {
        "kind": "pairs",
        "config": asdict(cfg),
        "n": n,
        "k": int(len(anchors)),
        "anchor_fraction": round(len(anchors) / max(1, n), 6),
        "lo": cfg.lo,
        "hi": cfg.hi,
        "m": cfg.m,
        "max_pairs": cfg.max_pairs,
        "num_pairs": int(len(pairs)),
        "anchors_with_positive": int(len(per_anchor)),
        "positives_per_anchor": positives_per_anchor(pairs.anchor_id, len(anchors)),
        "candidates_per_anchor": NEIGHBOURS,
        **stats,
        "files": files,
    }
    if len(pairs) == 0:
        best = float(near.similarity.max()) if len(near) else float("nan")
        body["warning"] = (
            f"no pair found with similarity in [{cfg.lo}, {cfg.hi}]: the most similar "
            f"neighbour below hi has similarity {best:.4f}. Relax the lower threshold "
            f"(lo <= {best:.4f}) or raise hi."
        )
        log.warning(body["warning"])
    return body
