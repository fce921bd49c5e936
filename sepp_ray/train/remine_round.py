"""A re-mining round on the training workers (`sepp_ray.train.remine` has the why).

Every rank embeds its share of the split (`sepp_ray.train.remine_targets`: from the split its
resident feed holds, or read from Parquet in Ray tasks), the embeddings are gathered, every
rank searches its share of the anchors, the pairs are gathered in anchor order and rank 0 writes
the round as a complete pairs result. Every rank then trains on the round read back from
storage, so a mined round and one read back after a restart are the same table. An error on
any rank (too many pairs, NaN features) reaches every rank alike: none is left waiting in a
collective, and rank 0 leaves the reason where the driver looks.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from sepp_ray import dist
from sepp_ray.errors import SeppError
from sepp_ray.storage import Location, begin_write, finish_write, read_manifest
from sepp_ray.train.remine import ROUND_FAILED, RemineSpec, round_uri

if TYPE_CHECKING:
    import pyarrow as pa

    from sepp_ray.methods.base import Method
    from sepp_ray.mining.mine import MineConfig, Mined


class Target(Protocol):
    """What a round embeds and re-itemises: the data plane a rank trains from."""

    device: torch.device

    def embed_share(
        self, encoder: torch.nn.Module, norm: tuple[torch.Tensor, torch.Tensor], size: int
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """(ids, labels (-1 unknown), L2-normalised fp32 features on the device) of this
        rank's share."""
        ...

    def set_items(self, table: pa.Table, r: int) -> None:
        """Train on round ``r``'s pairs (``table``: anchor_id, positive_id) from now on."""
        ...


def encoder_of(method: Method, which: str) -> torch.nn.Module:
    """The backbone a round embeds with."""
    momentum = method.momentum_backbone_or_none()
    if which == "momentum":
        if momentum is None:
            raise SeppError(f"method {method.name} has no momentum encoder to re-mine with")
        return momentum
    return method.backbone


def search_share(
    ids: np.ndarray,
    feats: torch.Tensor,
    cfg: MineConfig,
    device: torch.device,
    rank: int,
    world: int,
) -> tuple[np.ndarray, Any, Any]:
    """(all anchors, this rank's pairs, its anchors' nearest images below hi): the anchors
    are the first round's (same ids, same seed), cut in contiguous shares in anchor order, as
    `sepp mine` cuts them over its search actors, so the pairs equal one process' search."""
    from sepp_ray.mining.anchors import Vectors, choose_anchors
    from sepp_ray.mining.mine import search_window
    from sepp_ray.mining.search import auto_backend, build_searcher

    anchors = choose_anchors(ids, cfg.anchor_count(), cfg.seed)
    share = np.array_split(anchors, world)[rank]
    name = auto_backend() if cfg.backend == "auto" else cfg.backend
    # the torch backend searches the gathered features where they are; the others take numpy
    keys = Vectors(ids, feats if name == "torch" else feats.cpu().numpy())
    options: dict[str, Any] = {"nprobe": cfg.nprobe} if name == "faiss-ivf" else {}
    if name == "torch":
        options["device"] = device  # this rank's GPU, not the node's first
    searcher = build_searcher(keys, name, **options)
    queries = keys.take(np.searchsorted(ids, share))
    return (anchors, *search_window(searcher, queries, cfg))


def mine_round(
    spec: RemineSpec,
    target: Target,
    method: Method,
    norm: tuple[torch.Tensor, torch.Tensor],
    size: int,
) -> tuple[Mined, dict[int, int] | None, dict[str, Any]]:
    """Collective: every rank embeds its share, the embeddings are gathered, every rank
    searches its share of the anchors and the pairs are gathered in anchor order. Returns
    them, the labels by image id (None without labels) and the round's size and times."""
    from sepp_ray.mining.mine import Mined
    from sepp_ray.mining.search_base import Pairs, check_limit

    rank, world = dist.rank(), dist.world_size()
    t0 = time.perf_counter()
    encoder = encoder_of(method, spec.encoder)
    # every rank embeds with rank 0's encoder, the one its checkpoint saves: BatchNorm's running
    # statistics differ between ranks (used in eval mode only, so training does not change)
    dist.broadcast_module(encoder)
    ids, labels, feats = _embedded(target, encoder, norm, size)
    t1 = time.perf_counter()
    found = _gathered(lambda: search_share(ids, feats, spec.mining, target.device, rank, world))
    pairs = Pairs.concat([f[1] for f in found])
    try:  # each rank held a part; the whole may be over
        check_limit(len(pairs), spec.mining.max_pairs)
    except SeppError as e:
        raise RoundError(f"{e} (the re-mining round's pairs)") from e
    mined = Mined(found[0][0], pairs, Pairs.concat([f[2] for f in found]))
    info = {
        "n": len(ids),
        "embed_seconds": round(t1 - t0, 3),
        "search_seconds": round(time.perf_counter() - t1, 3),
    }
    known = labels >= 0
    by_id = dict(zip(ids[known].tolist(), labels[known].tolist(), strict=True))
    return mined, (by_id or None), info


def _embedded(
    target: Target,
    encoder: torch.nn.Module,
    norm: tuple[torch.Tensor, torch.Tensor],
    size: int,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Collective: (ids, labels, features) of the whole split on every rank, in id order,
    whatever order the ranks read their rows in (the same search on any plane). The features
    are gathered as one tensor on the device, never pickled."""
    try:
        ids, labels, feats = target.embed_share(encoder, norm, size)
        error = None
    except SeppError as e:
        ids, labels, feats, error = np.zeros(0, np.int64), np.zeros(0, np.int64), None, str(e)
    parts = _gathered(lambda: (ids, labels), error)  # an error on any rank stops all here
    assert feats is not None
    all_feats = dist.all_gather_rows(feats)
    all_ids = np.concatenate([p[0] for p in parts])
    order = np.argsort(all_ids, kind="stable")
    index = torch.from_numpy(order).to(all_feats.device)
    return all_ids[order], np.concatenate([p[1] for p in parts])[order], all_feats[index]


class RoundError(SeppError):
    """A round could not be mined (raised on every rank alike)."""


def _gathered(work: Any, failed: str | None = None) -> list[Any]:
    """Every rank's result of ``work()``, in rank order; a `SeppError` on any rank (or its
    earlier error ``failed``) raises a `RoundError` on every rank (none is left waiting in a
    collective)."""
    value, error = None, failed
    if error is None:
        try:
            value = work()
        except SeppError as e:
            error = str(e)
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


class Rounds:
    """One rank's re-mining: which round's items its data plane holds, and the next round,
    mined (collectively) or read back when an earlier attempt completed it."""

    def __init__(
        self,
        spec: RemineSpec,
        out_uri: str,
        target: Target,
        method: Method,
        norm: tuple[torch.Tensor, torch.Tensor],
        size: int,
    ) -> None:
        self.spec, self.out, self.target, self.method = spec, out_uri, target, method
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
        self._check_round(uri, r)
        self.target.set_items(read_round(uri), r)
        self.current = r
        return True

    def _check_round(self, uri: str, r: int) -> None:
        """A complete round must be this run's: mined at its epochs with its mining config (a
        run resumed with other settings would otherwise train on another run's pairs)."""
        from dataclasses import asdict

        m = read_manifest(uri)
        now = {"start_epoch": self.spec.start_of(r), "config": asdict(self.spec.mining)}
        was = {k: m.get(k) for k in now}
        if was != now:
            raise SeppError(
                f"round {r}'s pairs at {uri} were mined with other settings (epoch "
                f"{was['start_epoch']}, mining {was['config']}) than this run's (epoch "
                f"{now['start_epoch']}, mining {now['config']}): keep the settings to resume, "
                "or pass overwrite=true"
            )

    def _mine(self, r: int, epoch: int) -> None:
        """Mine round ``r`` from the weights of the checkpoint saved at ``epoch``."""
        from sepp_ray.train.progress import write_stage

        if dist.rank() == 0:
            write_stage(self.out, f"re-mining round {r}")
        mined, labels, info = mine_round(self.spec, self.target, self.method, self.norm, self.size)
        if dist.rank() == 0:
            info = {
                **info,
                "encoder_from": self.spec.encoder,
                "encoder_checkpoint_epoch": epoch,
                "workers": dist.world_size(),
            }
            m = write_round(self.spec, self.out, r, mined, labels, info)
            prec = (m.get("precision") or {}).get("overall")
            print(
                f"[sepp] re-mining round {r} (before epoch {epoch + 1}): {m['num_pairs']} pairs"
                + (f", precision {prec:.3f}" if prec is not None else ""),
                flush=True,
            )
        dist.barrier()  # every rank reads the round only once it is complete


def _error_json(r: int, error: str) -> bytes:
    import json

    return json.dumps({"round": r, "error": error}).encode()
