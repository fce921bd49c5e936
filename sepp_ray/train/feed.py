"""Feeding one rank: read its slices in parallel CPU tasks, decode, mix, cut into batches.

Each slice (a part of one row group, `sepp_ray.train.plan`) is read and decoded by a Ray task
scheduled on the rank's node, several ahead of the trainer; results arrive in plan order and go
through a seeded shuffle buffer, so for a given (seed, epoch, rank) the batches are the same on
every run. Rows of one multi-positive group (an anchor and its positives, stored together in the
pair-item table) move through the buffer as one unit, so they land in the same batch.

Decoding (`decode_rows`) is a pure function of a table and a seed: "full" passes images stored at
the training size to the GPU, which crops them; "crop" takes each view's random resized crop
from the stored image on the CPU (any size and aspect ratio: nothing is squashed first) and the
GPU does the rest; "eval" resizes the shorter side and center-crops (the kNN monitor).
"""

from __future__ import annotations

import io
import math
import queue
import threading
import zlib
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
from sepp_ray.train.plan import Slice

Batch = dict[str, np.ndarray]
DECODE_MODES = ("full", "crop", "eval", "bytes")


@dataclass(frozen=True)
class CropSpec:
    """One view's random resized crop (torchvision's RandomResizedCrop parameters)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class DecodeSpec:
    """How a task turns stored images into arrays; see the module docstring for the modes."""

    mode: str
    size: int  # "full"/"eval": the output side; "crop": unused (each view has its own)
    view1: CropSpec | None = None
    view2: CropSpec | None = None
    local: CropSpec | None = None
    n_local: int = 0
    max_positives: int = 1
    split: str | None = None  # image shards: the training split
    exclude: Any = None  # sorted ids (or an ObjectRef of them) that train from the item table
    columns: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            raise SeppError(f"decode mode must be one of {DECODE_MODES}, got {self.mode!r}")
        if self.mode == "crop" and (self.view1 is None or self.view2 is None):
            raise SeppError("crop decoding needs the two views' crop specs")


def _open(blob: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(blob))
    return img.convert("RGB") if img.mode != "RGB" else img


def crop_box(
    w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, width, height): 10 tries, then the central fallback."""
    area = w * h
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        cw, ch = int(round(h * max(ratio))), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def random_resized_crop(img: Image.Image, spec: CropSpec, rng: np.random.Generator) -> np.ndarray:
    left, top, cw, ch = crop_box(img.width, img.height, spec.scale, spec.ratio, rng)
    out = img.resize(
        (spec.size, spec.size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch)
    )
    return np.asarray(out)


def center_view(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bicubic), then the central size x size square."""
    w, h = img.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img)


def _full(img: Image.Image, size: int) -> np.ndarray:
    if img.size != (size, size):
        raise SeppError(
            f"an image of {img.size[0]}x{img.size[1]} in a dataset decoded at its stored size "
            f"{size}x{size}: the dataset's sizes are not uniform; train with crop decoding"
        )
    return np.asarray(img)


def _stack(arrays: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)


def decode_rows(table: pa.Table, spec: DecodeSpec, rng: np.random.Generator) -> Batch:
    """Stored rows -> arrays: id, label, image, image2 (and local crops), pos_ids, group."""
    n = table.num_rows
    cols = table.column_names
    ids = table["item_id" if "item_id" in cols else "id"].to_numpy().astype(np.int64)
    labels = (
        table["label"].fill_null(-1).to_numpy().astype(np.int64)
        if "label" in cols
        else np.full(n, -1, np.int64)
    )
    blobs = table["image"].to_pylist()
    blobs2 = table["image2"].to_pylist() if "image2" in cols else [None] * n
    if spec.mode == "bytes":  # decoded on the training device (`decode_on_device`)
        out_b: Batch = {"id": ids, "label": labels}
        out_b["image_bytes"] = np.array(blobs + [None], dtype=object)[:n]
        out_b["image2_bytes"] = np.array(blobs2 + [None], dtype=object)[:n]
        return {**out_b, **_extras(table, spec, n)}
    v1: list[np.ndarray] = []
    v2: list[np.ndarray] = []
    local: list[np.ndarray] = []
    for blob, blob2 in zip(blobs, blobs2, strict=True):
        img = _open(blob)
        img2 = _open(blob2) if blob2 is not None else img
        if spec.mode == "crop":
            assert spec.view1 is not None and spec.view2 is not None
            v1.append(random_resized_crop(img, spec.view1, rng))
            v2.append(random_resized_crop(img2, spec.view2, rng))
            if spec.local is not None:
                local.extend(random_resized_crop(img, spec.local, rng) for _ in range(spec.n_local))
        elif spec.mode == "eval":
            v1.append(center_view(img, spec.size))
        else:
            a = _full(img, spec.size)
            v1.append(a)
            v2.append(_full(img2, spec.size) if blob2 is not None else a)
    s1 = spec.view1.size if spec.mode == "crop" and spec.view1 else spec.size
    out: Batch = {"id": ids, "label": labels, "image": _stack(v1, s1)}
    if spec.mode == "eval":
        return out
    s2 = spec.view2.size if spec.mode == "crop" and spec.view2 else spec.size
    out["image2"] = _stack(v2, s2)
    if spec.local is not None and spec.n_local and spec.mode == "crop":
        sl = spec.local.size
        out["local"] = (
            np.stack(local).reshape(n, spec.n_local, sl, sl, 3)
            if n
            else np.zeros((0, spec.n_local, sl, sl, 3), np.uint8)
        )
    return {**out, **_extras(table, spec, n)}


def _extras(table: pa.Table, spec: DecodeSpec, n: int) -> Batch:
    """pos_ids (n x max_positives, -1 padded) and group of every row."""
    cols = table.column_names
    pos = np.full((n, spec.max_positives), -1, np.int64)
    if "pos_ids" in cols:
        for i, lst in enumerate(table["pos_ids"].to_pylist()):
            lst = (lst or [])[: spec.max_positives]
            pos[i, : len(lst)] = lst
    group = (
        table["group"].to_numpy().astype(np.int64) if "group" in cols else np.full(n, -1, np.int64)
    )
    return {"pos_ids": pos, "group": group}


def decode_on_device(batch: Batch, device: Any) -> dict[str, Any]:
    """A "bytes" batch -> tensors on ``device``, its JPEGs decoded there (nvJPEG on CUDA, via
    torchvision.io.decode_jpeg); image2 decoded only where it differs from image."""
    import torch
    from torchvision.io import decode_jpeg

    def decode(blobs: list[bytes]) -> Any:
        if any(b[:2] != b"\xff\xd8" for b in blobs):
            raise SeppError(
                "decode_on=gpu needs JPEG shards: ingest with images.encoding=jpeg, or decode "
                "on the CPU (decode_on=cpu)"
            )
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        return torch.stack(decode_jpeg(data, device=device)).permute(0, 2, 3, 1)  # B x H x W x 3

    out: dict[str, Any] = {
        k: torch.from_numpy(v).to(device, non_blocking=True)
        for k, v in batch.items()
        if k not in ("image_bytes", "image2_bytes")
    }
    image = decode(list(batch["image_bytes"]))
    image2 = image.clone()
    other = [i for i, b in enumerate(batch["image2_bytes"]) if b is not None]
    if other:
        image2[other] = decode([batch["image2_bytes"][i] for i in other])
    out["image"], out["image2"] = image, image2
    return out


def read_slice(part: Slice, spec: DecodeSpec, seed: int, epoch: int) -> Batch:
    """Read one slice's rows (its row group, filtered as the census counted) and decode them,
    with crops drawn from a generator seeded by (seed, epoch, file, row group, start)."""
    exclude = spec.exclude
    if exclude is not None and not isinstance(exclude, np.ndarray):
        import ray

        exclude = ray.get(exclude)
    c = part.chunk
    fs, path = filesystem(c.uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        wanted = [x for x in pf.schema_arrow.names if x not in ("key",)]
        table = pf.read_row_group(c.row_group, columns=wanted)
    if c.table == "images":
        table = table.filter(pa.array(row_filter(table, spec.split, exclude)))
    # a fresh order inside the row group every epoch, the same for every rank (so ranks that
    # share a row group take disjoint rows), groups kept together
    key = [seed, epoch, zlib.crc32(c.uri.encode()), c.row_group]
    group = (
        table["group"].to_numpy() if "group" in table.column_names else np.full(table.num_rows, -1)
    )
    table = table.take(pa.array(unit_order(group, np.random.default_rng([*key, 1]))))
    if table.num_rows != c.rows:
        raise SeppError(
            f"{c.uri} row group {c.row_group} holds {table.num_rows} training rows, the plan "
            f"counted {c.rows}: the data changed under a running job"
        )
    table = table.slice(part.start, part.rows)
    rng = np.random.default_rng([*key, 2, part.start])
    return decode_rows(table, spec, rng)


def concat(batches: list[Batch]) -> Batch:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def take(batch: Batch, index: np.ndarray) -> Batch:
    return {k: v[index] for k, v in batch.items()}


def units_of(group: np.ndarray) -> list[np.ndarray]:
    """Row indices of each unit: a run of rows of one group (group >= 0), or a single row."""
    n = len(group)
    if n == 0:
        return []
    starts = np.ones(n, bool)
    starts[1:] = (group[1:] != group[:-1]) | (group[1:] < 0)
    return np.split(np.arange(n), np.flatnonzero(starts)[1:])


def unit_order(group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random row order that keeps each run of rows of one group (group >= 0) together."""
    units = units_of(group)
    if not units:
        return np.zeros(0, np.int64)
    return np.concatenate([units[i] for i in rng.permutation(len(units))])


def pack(units: list[np.ndarray], batch: int, n_batches: int) -> tuple[list[np.ndarray], list[int]]:
    """Cut ``n_batches`` batches of exactly ``batch`` rows from units in their given order,
    never splitting a group while single rows can fill the gap (a group split over two batches
    loses the positives it was grouped for). Returns the batches and the unused units."""
    groups_ = [i for i, u in enumerate(units) if len(u) > 1]
    singles = [i for i, u in enumerate(units) if len(u) == 1]
    gi = si = 0
    out: list[np.ndarray] = []
    spill: list[int] = []  # rows of a unit split by the fallback, first in the next batch
    for _ in range(n_batches):
        parts: list[int] = spill[:batch]
        spill = spill[batch:]
        while len(parts) < batch and gi < len(groups_):
            u = units[groups_[gi]]
            if len(parts) + len(u) > batch and si < len(singles):
                break
            take = batch - len(parts)
            parts.extend(u[:take].tolist())
            spill.extend(u[take:].tolist())
            gi += 1
        while len(parts) < batch and si < len(singles):
            parts.append(int(units[singles[si]][0]))
            si += 1
        while len(parts) < batch and gi < len(groups_):  # no singles left: split a group
            u = units[groups_[gi]]
            take = batch - len(parts)
            parts.extend(u[:take].tolist())
            spill.extend(u[take:].tolist())
            gi += 1
        out.append(np.asarray(parts, np.int64))
    rest = spill + [r for i in groups_[gi:] for r in units[i].tolist()]
    rest += [int(units[i][0]) for i in singles[si:]]
    return out, rest


class ShuffleBuffer:
    """Seeded mixing of a stream of row blocks into fixed-size batches.

    Blocks are pooled until ``capacity`` rows; the pool's units are then put in a random order
    and packed into batches (`pack`), half the pool staying to mix with what comes next.
    """

    def __init__(self, batch: int, capacity: int, rng: np.random.Generator) -> None:
        self.batch = batch
        self.capacity = max(capacity, batch)
        self.rng = rng
        self.pool: list[Batch] = []
        self.rows = 0

    def _mix(self, final: bool) -> Iterator[Batch]:
        merged = concat(self.pool)
        units = units_of(merged["group"])
        units = [units[i] for i in self.rng.permutation(len(units))]
        keep = 0 if final else self.capacity // 2
        n_out = (self.rows - keep) // self.batch
        batches, rest = pack(units, self.batch, n_out)
        for idx in batches:
            yield take(merged, idx)
        self.pool = [take(merged, np.asarray(rest, np.int64))] if rest else []
        self.rows = len(rest)

    def push(self, block: Batch) -> Iterator[Batch]:
        if len(block["id"]):
            self.pool.append(block)
            self.rows += len(block["id"])
        if self.rows >= self.capacity + self.batch:
            yield from self._mix(final=False)

    def flush(self) -> Iterator[Batch]:
        if self.rows:
            yield from self._mix(final=True)


@dataclass(frozen=True)
class FeedConfig:
    """How a rank is fed: batch size, buffer, how far reading runs ahead."""

    local_batch: int
    buffer_rows: int = 4096  # shuffle buffer (rows); capped by buffer_bytes
    buffer_bytes: int = 512 * 2**20
    read_ahead: int = 8  # slices being read and decoded at once (Ray tasks)
    prefetch_batches: int = 2  # batches assembled ahead of the trainer (a thread)
    task_cpus: float = 1.0


def _remote_reader(cpus: float) -> Any:
    import ray

    return ray.remote(num_cpus=cpus)(read_slice)


def _buffer_rows(cfg: FeedConfig, spec: DecodeSpec) -> int:
    side = max(spec.size, spec.view1.size if spec.view1 else 0)
    per_row = 2 * side * side * 3 + spec.n_local * (spec.local.size if spec.local else 0) ** 2 * 3
    return max(cfg.local_batch, min(cfg.buffer_rows, cfg.buffer_bytes // max(per_row, 1)))


def iter_slices(
    slices: list[Slice], spec: DecodeSpec, seed: int, epoch: int, cfg: FeedConfig, use_ray: bool
) -> Iterator[Batch]:
    """Decoded slices in plan order; with Ray, ``read_ahead`` tasks run ahead on this node."""
    if not use_ray:
        for s in slices:
            yield read_slice(s, spec, seed, epoch)
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    task = _remote_reader(cfg.task_cpus).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)
    )
    pending: list[Any] = []
    it = iter(slices)
    for s in it:
        pending.append(task.remote(s, spec, seed, epoch))
        if len(pending) >= cfg.read_ahead:
            break
    while pending:
        ref = pending.pop(0)
        nxt = next(it, None)
        if nxt is not None:
            pending.append(task.remote(nxt, spec, seed, epoch))
        yield ray.get(ref)


def rank_batches(
    slices: list[Slice],
    spec: DecodeSpec,
    cfg: FeedConfig,
    seed: int,
    epoch: int,
    rank: int,
    steps: int,
    use_ray: bool = True,
) -> Iterator[Batch]:
    """Exactly ``steps`` batches of ``cfg.local_batch`` rows for this rank and epoch."""
    want = steps * cfg.local_batch
    have = sum(s.rows for s in slices)
    if have != want:
        raise SeppError(f"rank {rank} was planned {have} rows for {steps} steps of {want}")
    buf = ShuffleBuffer(
        cfg.local_batch, _buffer_rows(cfg, spec), np.random.default_rng([seed, epoch, rank, 7])
    )
    for block in iter_slices(slices, spec, seed, epoch, cfg, use_ray):
        yield from buf.push(block)
    yield from buf.flush()


def prefetched(batches: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run ``batches`` in a background thread, ``depth`` ahead (errors re-raised here)."""
    if depth <= 0:
        yield from batches
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for b in batches:
                q.put(b)
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True, name="sepp-feed")
    t.start()
    while True:
        item = q.get()
        if item is done:
            break
        if isinstance(item, BaseException):
            raise item
        yield item
    t.join()
