"""Where a re-mining round embeds from and what it re-itemises: the rank's data plane.

Resident: the split is decoded in the rank's memory (`ResidentFeed`); the rank embeds a
contiguous share of it and a round's items are new index arrays into it. Streaming: the rank
reads its share of the split's row groups in Ray tasks (decoded as evaluation decodes them, the
central square at the training size) and embeds them as they arrive; a round's pair items are
written once into the round's own item table (rank 0, a Ray Data job, as the driver writes the
first round's) and every rank streams from the new chunks. Either way an epoch keeps the plan's
step count: a round with fewer items than an epoch takes repeats them (``cycle``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sepp_ray import dist
from sepp_ray.storage import Location
from sepp_ray.train.remine import ROUNDS_DIR, RemineSpec

if TYPE_CHECKING:
    import pyarrow as pa

    from sepp_ray.train.dataplane import DataPlan
    from sepp_ray.train.feed import RankFeed
    from sepp_ray.train.items import ItemPlan
    from sepp_ray.train.resident import ResidentFeed

EMBED_BATCH = 512
READ_AHEAD = 4  # read tasks a streaming rank keeps in flight while it embeds


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


def _bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of ``n`` rows (ranks in order cover them all)."""
    cuts = np.linspace(0, n, world + 1).astype(np.int64)
    return int(cuts[rank]), int(cuts[rank + 1])


def _features(
    encoder: torch.nn.Module,
    pixels: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """uint8 B x 3 x S x S -> L2-normalised fp32 B x D on ``device``, as the sampler embeds."""
    from sepp_ray.mining.encoder import unit_features

    return unit_features(encoder, pixels, norm, device, "the encoder in training")


def _stack(
    ids: list[np.ndarray], labels: list[np.ndarray], feats: list[torch.Tensor], empty: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """A rank's share as (ids, labels, features on the device); ``empty`` when it has none."""
    if not feats:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), empty
    return np.concatenate(ids), np.concatenate(labels), torch.cat(feats)


def _empty(encoder: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """No features, at the encoder's width on ``device``: an empty share still gathers."""
    return torch.zeros((0, int(getattr(encoder, "num_features", 0) or 0)), device=device)


def plan_of(table: pa.Table, spec: RemineSpec) -> ItemPlan:
    """A round's item plan from its pairs (and the run's curated pairs, if any)."""
    from sepp_ray.train.items import plan_items, read_curated

    p = spec.pairs
    curated = read_curated(p.curated) if p.curated else None
    return plan_items(table, curated, p, spec.seed)


class ResidentTarget:
    """A round on the resident plane: embed from, and re-index, the split the rank holds."""

    def __init__(self, feed: ResidentFeed, spec: RemineSpec) -> None:
        self.feed, self.spec, self.device = feed, spec, feed.device

    def embed_share(
        self, encoder: torch.nn.Module, norm: tuple[torch.Tensor, torch.Tensor], size: int
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        feed = self.feed
        lo, hi = _bounds(len(feed.host_ids), dist.world_size(), dist.rank())
        feats = []
        for s in range(lo, hi, EMBED_BATCH):
            e = min(hi, s + EMBED_BATCH)
            pixels = square_uint8(feed.images[s:e].to(self.device).permute(0, 3, 1, 2), size)
            feats.append(_features(encoder, pixels, norm, self.device))
        return _stack(
            [feed.host_ids[lo:hi]], [feed.host_labels[lo:hi]], feats, _empty(encoder, self.device)
        )

    def set_items(self, table: pa.Table, r: int) -> None:
        from sepp_ray.train.resident import ResidentItems

        items = ResidentItems.of(plan_of(table, self.spec), self.spec.pairs.max_positives)
        self.feed.set_items(items)


class StreamTarget:
    """A round on the streaming plane: embed the rank's share of the split's row groups, read
    in Ray tasks; then stream from the round's own item table. ``data``/``stream``: the plan
    and the read pipeline the rank trains from (the worker reads them after every round)."""

    def __init__(self, data: DataPlan, spec: RemineSpec, out_uri: str, device: torch.device):
        self.data, self.spec, self.out, self.device = data, spec, out_uri, device
        self.stream: RankFeed | None = None

    def embed_share(
        self, encoder: torch.nn.Module, norm: tuple[torch.Tensor, torch.Tensor], size: int
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        ids, labels, feats = [], [], []
        for part in self._read_share(size):
            ids.append(part["id"])
            labels.append(part["label"])
            for s in range(0, len(part["id"]), EMBED_BATCH):
                pixels = torch.from_numpy(part["image"][s : s + EMBED_BATCH]).permute(0, 3, 1, 2)
                feats.append(_features(encoder, pixels, norm, self.device))
        return _stack(ids, labels, feats, _empty(encoder, self.device))

    def _read_share(self, size: int) -> Any:
        """This rank's row groups of the split, decoded in Ray tasks, ``READ_AHEAD`` in flight."""
        import ray

        from sepp_ray.train.census import outside_placement_group
        from sepp_ray.train.decode import DecodeSpec
        from sepp_ray.train.feed import read_slice
        from sepp_ray.train.plan import Slice

        chunks = (self.spec.image_chunks or [])[dist.rank() :: dist.world_size()]
        reader = ray.remote(num_cpus=0.25)(read_slice).options(
            scheduling_strategy=outside_placement_group()
        )
        spec = DecodeSpec("eval", size, split=self.spec.split)
        pending = [reader.remote(Slice(c, 0, c.rows), spec, 0, 0) for c in chunks[:READ_AHEAD]]
        for c in chunks[READ_AHEAD:] + [None] * min(READ_AHEAD, len(chunks)):
            done = ray.get(pending.pop(0))
            if c is not None:
                pending.append(reader.remote(Slice(c, 0, c.rows), spec, 0, 0))
            yield done

    def set_items(self, table: pa.Table, r: int) -> None:
        """Write round ``r``'s item table (rank 0; reused when complete) and stream from it."""
        import ray

        from sepp_ray.data.dataset import ImageDataset
        from sepp_ray.train.dataplane import item_table, training_chunks

        plan = plan_of(table, self.spec)
        ds = ImageDataset.open(self.spec.dataset)
        where = Location(self.out).child(ROUNDS_DIR, f"items-{r:03d}").uri
        args = (plan, ds, self.spec.split, where, self.spec.seed, self.spec.max_item_table_gb)
        if dist.rank() == 0:
            item_table(*args)
        dist.barrier()
        files = item_table(*args)  # complete now: every rank reads the same files
        exclude = ray.put(plan.exclude) if len(plan.exclude) else None
        chunks = training_chunks(ds, plan, files, self.spec.split, exclude)
        spec = replace(self.data.spec, exclude=exclude)
        self.data = replace(self.data, chunks=chunks, spec=spec, cycle=True)
        if self.stream is not None:
            self.stream.close()
        self.stream = None  # the worker starts the round's read pipeline
