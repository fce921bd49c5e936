"""The resident data plane: a split small enough to live decoded on the training device.

When a split's images, decoded at their stored size, fit comfortably in device memory (CIFAR-10
and -100, STL-10 at 96 px, ImageNet-100 at 64 px, ...), streaming them from Parquet every epoch
only adds CPU work a GPU then waits for. Instead the split is decoded once (parallel Ray tasks,
one per row group, outside any placement group; the driver holds only their ObjectRefs), every
rank copies it into one ``N x H x W x 3`` uint8 tensor on its device (pinned host memory when the
device cannot hold it), and a training item is a pair of row indices into that tensor: an
original is (i, i), a semantic or curated pair (anchor, positive). Each epoch is a seeded
permutation of single items over all ranks; a step gathers its rows on the device and the GPU
takes every view's random resized crop from the stored image (``GPUAugment``). No per-step CPU
work: the epoch's index matrix goes to the device once.

The GPU-resident CIFAR-10 loaders of the airbench line of work (Keller Jordan, 2024) showed the
same idea: a small dataset held decoded on the GPU feeds it millions of images per second.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sepp_ray.errors import SeppError
from sepp_ray.storage import filesystem
from sepp_ray.train.census import row_filter
from sepp_ray.train.items import ItemPlan
from sepp_ray.train.plan import Chunk

log = logging.getLogger(__name__)
DATA_PLANES = ("auto", "resident", "stream")
# a rank's copy of the split may take at most this share of the device's (or host's) memory
DEVICE_SHARE = 0.4
HOST_SHARE = 0.25


@dataclass(frozen=True)
class PlaneChoice:
    """Which data plane a run uses, and why (said on the console and in the manifest)."""

    mode: str  # "resident" or "stream"
    reason: str
    decoded_bytes: int  # the split decoded at its stored size (0 when sizes are not uniform)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason, "decoded_bytes": self.decoded_bytes}


def stored_shape(manifest: dict[str, Any]) -> tuple[int, int] | None:
    """(height, width) of every image of the dataset, or None when the sizes vary."""
    sizes = manifest.get("image_size", {})
    if not sizes.get("uniform"):
        return None
    return int(sizes["height"][0]), int(sizes["width"][0])


def choose_plane(
    requested: str,
    manifest: dict[str, Any],
    split: str,
    decode_on: str,
    budget_bytes: int,
) -> PlaneChoice:
    """Resident when the split's decoded images fit in ``budget_bytes`` (a rank's share of its
    device or host memory) and are all one size; otherwise streaming. ``requested`` forces one
    ("resident" refuses what it cannot do, with the reason); ``decode_on=gpu`` is a streaming
    option, so ``auto`` then streams and ``resident`` is refused."""
    if requested not in DATA_PLANES:
        raise SeppError(f"data_plane must be one of {DATA_PLANES}, got {requested!r}")
    shape = stored_shape(manifest)
    n = int(manifest["splits"][split]["total"])
    need = n * shape[0] * shape[1] * 3 if shape else 0
    gib = need / 2**30
    if requested == "stream":
        return PlaneChoice("stream", "data_plane=stream", need)
    why_not = None
    if decode_on == "gpu":
        why_not = "decode_on=gpu decodes streamed JPEG bytes on the device"
    elif shape is None:
        why_not = "the images are of several sizes (ingest with images.resize to make them one)"
    elif need > budget_bytes:
        why_not = (
            f"the split decoded takes {gib:.2f} GiB, over the {budget_bytes / 2**30:.2f} GiB a "
            "rank may hold (raise resident_max_gb)"
        )
    if why_not is None:
        return PlaneChoice(
            "resident", f"{n} images decoded take {gib:.2f} GiB per rank: held in memory", need
        )
    if requested == "resident":
        raise SeppError(f"data_plane=resident cannot apply: {why_not}; use data_plane=auto")
    return PlaneChoice("stream", why_not, need)


def decode_chunk(chunk: Chunk, split: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """One row group's images of ``split``, decoded: id (int64), label (int64, -1 unlabelled),
    image (n x H x W x 3 uint8, written in place: one copy per image)."""
    fs, path = filesystem(chunk.uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in ("id", "label", "split", "image") if c in pf.schema_arrow.names]
        table = pf.read_row_group(chunk.row_group, columns=cols)
    table = table.filter(pa.array(row_filter(table, split, None)))
    n = table.num_rows
    out = np.empty((n, shape[0], shape[1], 3), np.uint8)
    for i, blob in enumerate(table["image"].to_pylist()):
        img: Image.Image = Image.open(io.BytesIO(blob))
        img = img.convert("RGB") if img.mode != "RGB" else img
        if img.size != (shape[1], shape[0]):
            raise SeppError(
                f"{chunk.uri}: an image of {img.size[0]}x{img.size[1]} in a dataset whose "
                f"manifest says every image is {shape[1]}x{shape[0]}: re-ingest it"
            )
        out[i] = np.asarray(img)
    labels = (
        table["label"].fill_null(-1).to_numpy().astype(np.int64)
        if "label" in table.column_names
        else np.full(n, -1, np.int64)
    )
    return {"id": table["id"].to_numpy().astype(np.int64), "label": labels, "image": out}


def _decode_with_ids(
    chunk: Chunk, split: str, shape: tuple[int, int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    part = decode_chunk(chunk, split, shape)
    return part["id"], part


def decode_split(
    chunks: list[Chunk], split: str, shape: tuple[int, int], cpus: float
) -> tuple[list[Any], list[Any]]:
    """Every chunk decoded by a Ray task outside any placement group: ObjectRefs of the image
    ids (small: the driver checks the items against them) and of the decoded parts (the driver
    never fetches those: each rank does)."""
    import ray

    from sepp_ray.train.census import outside_placement_group

    task = ray.remote(num_cpus=cpus, num_returns=2)(_decode_with_ids).options(
        scheduling_strategy=outside_placement_group()
    )
    refs: list[Any] = [task.remote(c, split, shape) for c in chunks]  # (ids, part) each
    return [r[0] for r in refs], [r[1] for r in refs]


def split_ids(id_refs: list[Any]) -> np.ndarray:
    """The split's image ids, sorted (8 bytes an image: what the driver may hold)."""
    import ray

    parts = ray.get(id_refs)
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class ResidentItems:
    """A run's items as ids: what each rank turns into row indices once the split is loaded.

    Originals are the split's images minus ``exclude`` (grouped images train in their groups);
    the pair items are the `ItemPlan`'s rows (b = -1: the same image twice).
    """

    originals: bool
    exclude: np.ndarray
    item_id: np.ndarray
    a: np.ndarray
    b: np.ndarray
    unit: np.ndarray
    group: np.ndarray
    pos: np.ndarray  # rows x max_positives, -1 padded

    @classmethod
    def of(cls, plan: ItemPlan, max_positives: int) -> ResidentItems:
        pos = np.full((plan.rows, max_positives), -1, np.int64)
        for i, lst in enumerate(plan.pos):
            lst = lst[:max_positives]
            pos[i, : len(lst)] = lst
        return cls(
            plan.originals, plan.exclude, plan.item_id, plan.a, plan.b, plan.unit, plan.group, pos
        )

    def count(self, split_images: int) -> int:
        """Training items, given how many images the split holds."""
        return (split_images - len(self.exclude) if self.originals else 0) + len(self.item_id)


@dataclass(frozen=True)
class ItemIndex:
    """Every training item as rows of the loaded split (numpy; a rank moves it to its device)."""

    row_a: np.ndarray  # int64: row of view 1's image
    row_b: np.ndarray  # int64: row of view 2's image
    item_id: np.ndarray  # int64: an original's image id, a pair item's derived id
    group: np.ndarray  # int64: -1 or the item's group
    pos: np.ndarray  # int64 n x P: semantic positives' image ids, -1 padded
    unit: np.ndarray  # int64: items of one unit (a group) go to one batch together

    @property
    def rows(self) -> int:
        return len(self.row_a)


def index_items(items: ResidentItems, ids: np.ndarray) -> ItemIndex:
    """Row indices of every item into the split sorted by id (``ids``, ascending)."""

    def rows_of(want: np.ndarray, what: str) -> np.ndarray:
        at = np.searchsorted(ids, want)
        bad = (at >= len(ids)) | (ids[np.minimum(at, len(ids) - 1)] != want)
        if bad.any():
            raise SeppError(
                f"{int(bad.sum())} {what} name image id(s) absent from the training split (e.g. "
                f"id {int(want[bad][0])}): mine the pairs on the dataset and split you train on"
            )
        return at.astype(np.int64)

    orig = ids[~np.isin(ids, items.exclude)] if items.originals else ids[:0]
    a = rows_of(items.a, "pair items")
    b = np.where(items.b >= 0, rows_of(np.where(items.b >= 0, items.b, items.a), "pairs"), a)
    orig_rows = np.searchsorted(ids, orig).astype(np.int64)
    p = items.pos.shape[1] if items.pos.ndim == 2 else 1
    return ItemIndex(
        row_a=np.concatenate([orig_rows, a]),
        row_b=np.concatenate([orig_rows, b]),
        item_id=np.concatenate([orig, items.item_id]),
        group=np.concatenate([np.full(len(orig), -1, np.int64), items.group]),
        pos=np.concatenate([np.full((len(orig), p), -1, np.int64), items.pos.reshape(-1, p)]),
        # originals are units of one; plan units are derived ids, disjoint from image ids
        unit=np.concatenate([orig, items.unit]),
    )


def epoch_index(
    unit: np.ndarray,
    seed: int,
    epoch: int,
    world: int,
    rank: int,
    steps: int,
    local: int,
    *,
    cycle: bool = False,
) -> np.ndarray:
    """This rank's items of ``epoch`` as a ``steps x local`` matrix of item indices.

    A seeded permutation of all items (or of units, when groups exist: a group then fills one
    batch together), the same for every rank; global step s takes the next ``world x local``
    items and rank r the r-th ``local`` of them. So every item is used at most once an epoch,
    the leftovers (fewer than one global batch) differ between epochs, and the order is a pure
    function of (seed, epoch, world, rank): the same on a resumed run.
    """
    from sepp_ray.train.shuffle import pack_units, ragged

    if not 0 <= rank < world:
        raise SeppError(f"rank {rank} outside a world of {world}")
    need = steps * world * local
    if need > len(unit) and not cycle:
        raise SeppError(f"{world} ranks x {steps} steps x {local} items exceed {len(unit)} items")
    passes = max(1, -(-need // max(1, len(unit)))) if cycle else 1
    rng = np.random.default_rng([seed, epoch, 0x2E51])
    _, first, inverse = np.unique(unit, return_index=True, return_inverse=True)
    if len(first) == len(unit):  # no groups: a plain permutation (one per pass)
        order = np.concatenate([rng.permutation(len(unit)) for _ in range(passes)])[:need]
        return order.reshape(steps, world, local)[:, rank].copy()
    members = np.argsort(inverse, kind="stable")  # items of each unit, in item order
    lens = np.bincount(inverse)
    perm = np.concatenate([rng.permutation(len(lens)) for _ in range(passes + 1 if cycle else 1)])
    rows = members[ragged((np.cumsum(lens) - lens)[perm], lens[perm])]
    batches, _ = pack_units(rows, lens[perm], local, steps * world)
    return np.stack(batches).reshape(steps, world, local)[:, rank].copy()


@dataclass(frozen=True)
class ResidentPlan:
    """What every rank needs to serve its batches of any epoch from memory."""

    refs: list[Any]  # ObjectRefs of `decode_chunk` outputs
    shape: tuple[int, int]  # stored (height, width)
    images: int  # images of the split
    items: ResidentItems
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    seed: int
    choice: PlaneChoice = field(default_factory=lambda: PlaneChoice("resident", "", 0))

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def rows(self) -> int:
        return self.items.count(self.images)

    def local_batch(self, world: int) -> int:
        return self.global_batch // world

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of 0-based ``epoch``."""
        return max(0, min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch))


class ResidentFeed:
    """One rank's copy of the split on its device, and its batches of any epoch."""

    def __init__(self, plan: ResidentPlan, device: Any, host_only: bool | None = None) -> None:
        import torch

        self.plan = plan
        self.device = torch.device(device)
        ids, labels, images = _load(plan.refs, plan.shape)
        if len(ids) != plan.images:
            raise SeppError(
                f"the split holds {len(ids)} images, the plan counted {plan.images}: the data "
                "changed under a running job"
            )
        self.host_ids, self.host_labels = ids, labels
        index = index_items(plan.items, ids)
        if index.rows != plan.rows:
            raise SeppError(f"{index.rows} items indexed, the plan counted {plan.rows}")
        self.cycle = False  # the plan's items always fill an epoch
        if host_only is None:
            host_only = self.device.type == "cuda" and _too_big(images.nbytes, self.device)
        self.host_only = host_only
        self.where = torch.device("cpu") if host_only else self.device
        t = torch.from_numpy(images)
        if host_only and torch.cuda.is_available():
            t = t.pin_memory()  # gathered on the host, copied asynchronously
        self.images = t.to(self.where)
        self.labels = torch.from_numpy(labels).to(self.where)
        self.ids = torch.from_numpy(ids).to(self.where)
        self._hold(index)

    def _hold(self, index: ItemIndex) -> None:
        import torch

        def put(x: np.ndarray) -> Any:
            return torch.from_numpy(np.ascontiguousarray(x)).to(self.where)

        self.unit = index.unit
        self.row_a, self.row_b = put(index.row_a), put(index.row_b)
        self.item_id, self.group, self.pos = put(index.item_id), put(index.group), put(index.pos)

    def set_items(self, items: ResidentItems) -> None:
        """Train on ``items`` from now on (a re-mining round's). The epoch keeps the plan's
        step count: a round with fewer items than an epoch takes repeats them, in a fresh
        seeded order each pass (`epoch_index` with ``cycle``)."""
        self._hold(index_items(items, self.host_ids))
        self.cycle = True

    def batches(self, epoch: int, world: int, rank: int) -> Iterator[dict[str, Any]]:
        """This rank's batches of ``epoch``: dicts of tensors on the training device, in the
        layout the streaming plane yields (images B x H x W x 3 uint8)."""
        import torch

        plan = self.plan
        steps = plan.steps_in(epoch)
        local = plan.local_batch(world)
        order = epoch_index(
            self.unit, plan.seed, epoch, world, rank, steps, local, cycle=self.cycle
        )
        order_t = torch.from_numpy(order).to(self.where)
        for s in range(steps):
            batch = self._gather(order_t[s])
            if self.host_only:
                batch = {k: _to_device(v, self.device) for k, v in batch.items()}
            yield batch

    def _rows(self, rows: Any) -> Any:
        """Images of ``rows`` (B x H x W x 3): one gather of whole rows (a flat view gathers
        about twice as fast on a CPU as indexing the 4-d tensor)."""
        flat = self.images.view(self.images.shape[0], -1)
        return flat.index_select(0, rows).view(-1, *self.images.shape[1:])

    def _gather(self, idx: Any) -> dict[str, Any]:
        import torch

        ra, rb = self.row_a[idx], self.row_b[idx]
        return {
            "image": self._rows(ra),
            "image2": self._rows(rb),
            "id": self.item_id[idx],
            "label": self.labels[ra],
            "pos_ids": self.pos[idx],
            "group": self.group[idx],
            "view_ids": torch.stack((self.ids[ra], self.ids[rb]), dim=1),
        }


def _to_device(t: Any, device: Any) -> Any:
    """A host tensor gathered for one step -> ``device``, through pinned memory (async copy)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _too_big(nbytes: int, device: Any) -> bool:
    """Whether the split should stay in pinned host memory rather than on a CUDA ``device``."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return nbytes > DEVICE_SHARE * free


def _load(refs: list[Any], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The decoded split sorted by image id: ids, labels, images (one host copy)."""
    import ray

    # decoded parts, or their ObjectRefs (fetched here: zero-copy from this node's store)
    parts = [r if isinstance(r, dict) else ray.get(r) for r in refs]
    n = sum(len(p["id"]) for p in parts)
    ids = np.concatenate([p["id"] for p in parts]) if parts else np.zeros(0, np.int64)
    labels = np.concatenate([p["label"] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    images = np.empty((n, shape[0], shape[1], 3), np.uint8)
    at = np.empty(n, np.int64)
    at[order] = np.arange(n)  # where each concatenated row lands in id order
    pos = 0
    for p in parts:
        k = len(p["id"])
        images[at[pos : pos + k]] = p["image"]
        pos += k
    ids = ids[order]
    if n and (np.diff(ids) == 0).any():
        raise SeppError("the split holds repeated image ids: re-ingest the dataset")
    return ids, labels[order], images
