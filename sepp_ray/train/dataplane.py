"""The pretraining data plane, planned by the driver and executed by every rank.

The driver never reads image bytes. It plans the pair items from ids (`items.plan_items`), has a
Ray Data job write them with their images into the run's ``items/`` table (once per run: a
resumed run reuses it), counts the training rows of every row group in Ray tasks
(`census`), and hands the ranks a `DataPlan`: the chunk list, how to decode, the step budget.
Each rank then derives its own rows of each epoch from (seed, epoch, rank) and streams them
(`feed.rank_batches`): a fresh global order every epoch, the same on every restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.data.recipes import TwoViewRecipe
from sepp_ray.errors import SeppError
from sepp_ray.storage import Location
from sepp_ray.train.census import census, outside_placement_group
from sepp_ray.train.feed import (
    Batch,
    CropSpec,
    DecodeSpec,
    EpochPart,
    FeedConfig,
    RankFeed,
    prefetched,
    rank_batches,
)
from sepp_ray.train.item_table import ITEM_TABLE_VERSION, write_item_table
from sepp_ray.train.items import ItemPlan
from sepp_ray.train.plan import Chunk, Slice, rank_slices, total_rows
from sepp_ray.train.resident import PlaneChoice

log = logging.getLogger(__name__)
ITEMS_DIR = "items"
ITEMS_DONE = "_items.json"


@dataclass(frozen=True)
class DataPlan:
    """Everything a rank needs to produce its batches of any epoch."""

    chunks: list[Chunk]
    spec: DecodeSpec
    feed: FeedConfig
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    seed: int
    choice: PlaneChoice = field(default_factory=lambda: PlaneChoice("stream", "", 0))
    # a re-mining round's items: an epoch keeps the plan's steps, cycling fewer items
    cycle: bool = False

    @property
    def epochs(self) -> int:
        """Epochs the run takes (the last may stop part way when a step budget is set)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def rows(self) -> int:
        return total_rows(self.chunks)

    def local_batch(self, world: int) -> int:
        return self.global_batch // world

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of 0-based ``epoch``."""
        return max(0, min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch))

    def slices(self, epoch: int, world: int, rank: int) -> list[Slice]:
        local = self.global_batch // world
        rows = self.steps_in(epoch) * local
        return rank_slices(self.chunks, self.seed, epoch, world, rank, rows, self.cycle)

    def batches(self, epoch: int, world: int, rank: int, use_ray: bool = True) -> Iterator[Batch]:
        """This rank's batches of ``epoch``, read ahead in Ray tasks and a prefetch thread."""
        steps = self.steps_in(epoch)
        parts = self.slices(epoch, world, rank)
        it = rank_batches(parts, self.spec, self.feed, self.seed, epoch, rank, steps, use_ray)
        return prefetched(it, self.feed.prefetch_batches)

    def stream(
        self,
        world: int,
        rank: int,
        first_epoch: int = 0,
        use_ray: bool = True,
        stop_epoch: int | None = None,
    ) -> RankFeed:
        """This rank's batches of every epoch from ``first_epoch`` on, up to ``stop_epoch``
        (default: the last; ``.epoch(e)``, in turn): one pipeline of reads, the next epoch's
        already in flight at an epoch's end."""
        stop = self.epochs if stop_epoch is None else min(stop_epoch, self.epochs)
        parts = (
            EpochPart(e, self.slices(e, world, rank), self.steps_in(e))
            for e in range(first_epoch, stop)
        )
        return RankFeed(parts, self.spec, self.feed, self.seed, rank, use_ray)


def decode_spec(
    manifest: dict[str, Any],
    size: int,
    recipe: TwoViewRecipe,
    max_positives: int,
    split: str,
    decode_on: str = "cpu",
) -> DecodeSpec:
    """Full images to the GPU when the dataset is stored at the training size (the GPU crops
    them); otherwise each view's random resized crop is taken from the stored image, whatever
    its size and aspect ratio, and the GPU skips its crop. The crops are taken on the CPU, or
    with ``decode_on="gpu"`` on the device from shipped JPEG bytes (mode "bytes" keeping the
    view crops; `device_decode`)."""
    from dataclasses import replace

    spec = _cpu_decode_spec(manifest, size, recipe, max_positives, split)
    if decode_on != "gpu":
        return spec
    if manifest.get("options", {}).get("encoding") == "png":
        raise SeppError("decode_on=gpu needs JPEG shards: ingest with images.encoding=jpeg")
    return replace(spec, mode="bytes")


def _cpu_decode_spec(
    manifest: dict[str, Any], size: int, recipe: TwoViewRecipe, max_positives: int, split: str
) -> DecodeSpec:
    sizes = manifest.get("image_size", {})
    stored = bool(sizes.get("uniform")) and sizes["width"][0] == sizes["height"][0] == size
    if stored:
        return DecodeSpec("full", size, max_positives=max_positives, split=split)

    def crop(r: Any) -> CropSpec:
        return CropSpec(r.crop_size, tuple(r.crop_scale), tuple(r.crop_ratio))

    if not recipe.view1.enabled("crop"):
        # the "no crop" ablation still needs one size: the whole image, squashed by the crop
        # of scale 1 and the image's own ratio is not a fixed shape, so take the central square
        raise SeppError(
            "drop_augment=crop needs images stored at the training size: ingest with "
            f"images.resize={size} images.center_crop=true"
        )
    local = recipe.local if recipe.n_local else None
    return DecodeSpec(
        "crop",
        size,
        view1=crop(recipe.view1),
        view2=crop(recipe.view2),
        local=crop(local) if local is not None else None,
        n_local=recipe.n_local,
        max_positives=max_positives,
        split=split,
    )


def _plan_hash(plan: ItemPlan, dataset: str, split: str) -> str:
    # the table's schema version too: a table of older columns is rebuilt, not reused
    h = hashlib.sha256(f"{dataset}|{split}|items-v{ITEM_TABLE_VERSION}".encode())
    for arr in (plan.item_id, plan.a, plan.b, plan.kind, plan.group):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(json.dumps(plan.pos).encode())
    return h.hexdigest()[:16]


def item_table(
    plan: ItemPlan,
    ds: ImageDataset,
    split: str,
    out: str,
    seed: int,
    max_gb: float | None = None,
) -> list[str]:
    """The run's pair-item table: written once (a Ray Data job), reused when a resumed run
    finds it complete for the same plan. Its estimated size is said first and refused past
    ``max_gb`` GiB."""
    loc = Location(out).child(ITEMS_DIR)
    key = _plan_hash(plan, ds.uri, split)
    if loc.exists(ITEMS_DONE):
        done = json.loads(loc.read_bytes(ITEMS_DONE))
        if done.get("plan") == key:
            return list(done["files"])
    if loc.exists():
        loc.fs.rm(loc.path, recursive=True)
    if plan.rows == 0:
        return []
    fs, _ = _fs(ds.uri)
    files = write_item_table(plan, ds.file_paths(), fs, split, loc.uri, seed, max_gb=max_gb)
    loc.write_bytes(ITEMS_DONE, json.dumps({"plan": key, "files": files}).encode())
    return files


def _fs(uri: str) -> tuple[Any, str]:
    from sepp_ray.storage import filesystem

    return filesystem(uri)


def image_files(ds: ImageDataset) -> list[str]:
    """The dataset's shard files as URIs (what a task on any node opens)."""
    base = Location(ds.uri)
    return [base.child(f["path"]).uri for f in ds.manifest["files"]]


def training_chunks(
    ds: ImageDataset, plan: ItemPlan, items: list[str], split: str, exclude: Any
) -> list[Chunk]:
    """Row groups of the originals (the split's images minus grouped ones) and of the items."""
    chunks = census(image_files(ds), "images", split, exclude) if plan.originals else []
    return chunks + census(items, "items", None, None)


def monitor_sets(
    ds: ImageDataset,
    split: str,
    query_split: str,
    size: int,
    max_train: int,
    max_query: int,
    seed: int,
) -> dict[str, Any]:
    """Bounded, seeded samples for the kNN monitor, as ObjectRefs of decoded arrays: a few row
    groups of each split are read (never the whole split), in Ray tasks."""
    import ray

    from sepp_ray.train.feed import read_slice

    reader = ray.remote(num_cpus=0.25)(read_slice).options(
        scheduling_strategy=outside_placement_group()
    )

    def sample(sp: str, n: int, salt: int) -> list[Any]:
        chunks = census(image_files(ds), "images", sp, None)
        order = np.random.default_rng([seed, salt]).permutation(len(chunks))
        refs, got = [], 0
        spec = DecodeSpec("eval", size, split=sp)
        for i in order.tolist():
            c = chunks[i]
            take = min(c.rows, n - got)
            if take <= 0:
                break
            refs.append(reader.remote(Slice(c, 0, take), spec, seed, 0))
            got += take
        return refs

    return {"train": sample(split, max_train, 1), "query": sample(query_split, max_query, 2)}
