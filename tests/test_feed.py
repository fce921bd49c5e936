"""The data plane's parts: epoch plans, decoding modes, the shuffle buffer, the feed across epochs
(one test reads through Ray tasks on the session's cluster)."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sepp_ray.errors import SeppError
from sepp_ray.train.decode import (
    CropSpec,
    DecodeSpec,
    crop_box,
    decode_on_device,
    decode_parts,
    decode_rows,
)
from sepp_ray.train.feed import (
    Batch,
    EpochPart,
    FeedConfig,
    RankFeed,
    ShuffleBuffer,
    auto_read_ahead,
    rank_batches,
    task_groups,
    units_of,
)
from sepp_ray.train.plan import Chunk, Slice, rank_slices
from sepp_ray.train.shuffle import pack_units
from tests.imagetree import encode, rgb


def _chunks() -> list[Chunk]:
    return [Chunk(f"f{i}", 0, 10 + i, "images") for i in range(12)] + [
        Chunk(f"p{i}", 0, 7, "items") for i in range(4)
    ]


def test_rank_slices_are_disjoint_cover_their_share_and_change_per_epoch() -> None:
    chunks = _chunks()
    for world in (1, 2, 3):
        per_rank = (sum(c.rows for c in chunks) // (world * 8)) * 8
        rows = set()
        for r in range(world):
            parts = rank_slices(chunks, 0, 0, world, r, per_rank)
            assert sum(p.rows for p in parts) == per_rank
            for p in parts:
                mine = {(p.chunk.uri, i) for i in range(p.start, p.stop)}
                assert not rows & mine
                rows |= mine
    a = rank_slices(chunks, 0, 0, 2, 0, 64)
    assert a == rank_slices(chunks, 0, 0, 2, 0, 64)  # a pure function of (seed, epoch)
    assert a != rank_slices(chunks, 0, 1, 2, 0, 64)
    with pytest.raises(SeppError, match="exceed"):
        rank_slices(chunks, 0, 0, 2, 0, 10_000)


def test_crop_box_follows_random_resized_crop() -> None:
    rng = np.random.default_rng(0)
    for w, h in ((256, 341), (500, 100), (32, 32)):
        for _ in range(200):
            left, top, cw, ch = crop_box(w, h, (0.08, 1.0), (3 / 4, 4 / 3), rng)
            assert 0 <= left <= w - cw and 0 <= top <= h - ch and cw > 0 and ch > 0
            assert cw * ch <= w * h
    # no valid try: torchvision's fallback, the central crop clamped to the ratio range
    assert crop_box(1000, 10, (0.99, 1.0), (1.0, 1.0), rng) == (495, 0, 10, 10)


def _table(n: int = 4, size: int = 32, fmt: str = "PNG") -> pa.Table:
    blobs = [encode(rgb(i, size), fmt) for i in range(n)]
    return pa.table(
        {
            "item_id": pa.array(range(n), pa.int64()),
            "image_id": pa.array([10, 11, 12, 13][:n], pa.int64()),
            "image2_id": pa.array([-1, 10, -1, -1][:n], pa.int64()),
            "image": blobs,
            "image2": [None, blobs[0], None, None][:n],
            "label": pa.array([1, None, 2, 3][:n], pa.int32()),
            "group": pa.array([-1, 5, 5, -1][:n], pa.int64()),
            "pos_ids": [[], [2], [1], []][:n],
        }
    )


def test_decode_modes() -> None:
    rng = np.random.default_rng(0)
    t = _table()
    full = decode_rows(t, DecodeSpec("full", 32, max_positives=2), rng)
    assert full["image"].shape == (4, 32, 32, 3) and full["label"].tolist() == [1, -1, 2, 3]
    np.testing.assert_array_equal(full["image2"][1], full["image"][0])  # image2 = the positive
    np.testing.assert_array_equal(full["image2"][2], full["image"][2])  # null = the image itself
    assert full["pos_ids"].tolist() == [[-1, -1], [2, -1], [1, -1], [-1, -1]]
    crop = DecodeSpec(
        "crop", 24, view1=CropSpec(24), view2=CropSpec(16), local=CropSpec(8), n_local=2
    )
    c = decode_rows(t, crop, rng)
    assert c["image"].shape == (4, 24, 24, 3) and c["image2"].shape == (4, 16, 16, 3)
    assert c["local"].shape == (4, 2, 8, 8, 3)
    ev = decode_rows(_table(size=40), DecodeSpec("eval", 32), rng)
    assert ev["image"].shape == (4, 32, 32, 3) and "image2" not in ev
    with pytest.raises(SeppError, match="not uniform"):
        decode_rows(_table(size=40), DecodeSpec("full", 32), rng)


def test_jpeg_bytes_decode_on_the_device_as_on_the_cpu() -> None:
    t = _table(fmt="JPEG")
    rng = np.random.default_rng(0)
    raw = decode_rows(t, DecodeSpec("bytes", 32), rng)
    on_dev = decode_on_device(raw, "cpu")  # the CUDA path is the same call on a GPU
    cpu = decode_rows(t, DecodeSpec("full", 32), rng)
    assert on_dev["image"].shape == (4, 32, 32, 3)
    diff = np.abs(on_dev["image"].numpy().astype(int) - cpu["image"].astype(int))
    assert diff.max() <= 2  # two libjpeg builds may round an IDCT differently
    np.testing.assert_array_equal(on_dev["image2"][1].numpy(), on_dev["image"][0].numpy())
    with pytest.raises(SeppError, match="needs JPEG shards"):
        decode_on_device(decode_rows(_table(), DecodeSpec("bytes", 32), rng), "cpu")


def test_pack_keeps_groups_whole_while_singles_fill_the_gaps() -> None:
    group = np.array([-1, 3, 3, 3, -1, -1, 4, 4, -1, -1, -1, -1, 9, 9, 9, 9])
    lens = units_of(group)
    assert lens.tolist() == [1, 3, 1, 1, 2, 1, 1, 1, 1, 4]
    batches, rest = pack_units(np.arange(len(group)), lens, 4, 3)
    assert all(len(b) == 4 for b in batches) and len(rest) == 4
    for b in batches:
        for g in (3, 4, 9):
            members = set(np.flatnonzero(group == g).tolist())
            assert not members & set(b.tolist()) or members <= set(b.tolist())


def test_shuffle_buffer_is_seeded_and_loses_no_row() -> None:
    def run(seed: int) -> list[list[int]]:
        buf = ShuffleBuffer(8, 16, np.random.default_rng(seed))
        out = []
        for k in range(6):
            block = {"id": np.arange(k * 8, k * 8 + 8), "group": np.full(8, -1)}
            out += [b["id"].tolist() for b in buf.push(block)]
        out += [b["id"].tolist() for b in buf.flush()]
        return out

    a = run(0)
    assert sorted(x for b in a for x in b) == list(range(48)) and all(len(b) == 8 for b in a)
    assert a == run(0) and a != run(1)


def _reference_pack(
    units: list[np.ndarray], batch: int, n_batches: int
) -> tuple[list[list[int]], list[int]]:
    """The packing rule row by row, as first written: the oracle for the vectorised one."""
    groups = [u.tolist() for u in units if len(u) > 1]
    singles = [int(u[0]) for u in units if len(u) == 1]
    gi = si = 0
    out: list[list[int]] = []
    spill: list[int] = []
    for _ in range(n_batches):
        parts, spill = spill[:batch], spill[batch:]
        while len(parts) < batch and gi < len(groups):
            if len(parts) + len(groups[gi]) > batch and si < len(singles):
                break
            take = batch - len(parts)
            parts, spill = parts + groups[gi][:take], spill + groups[gi][take:]
            gi += 1
        while len(parts) < batch and si < len(singles):
            parts.append(singles[si])
            si += 1
        while len(parts) < batch and gi < len(groups):
            take = batch - len(parts)
            parts, spill = parts + groups[gi][:take], spill + groups[gi][take:]
            gi += 1
        out.append(parts)
    return out, spill + [r for g in groups[gi:] for r in g] + singles[si:]


def test_vectorised_pack_matches_the_row_by_row_rule() -> None:
    rng = np.random.default_rng(3)
    for _ in range(300):
        lens = rng.choice([1, 1, 1, 1, 2, 3, 5, 9], size=int(rng.integers(0, 40)))
        rows = rng.permutation(int(lens.sum()))
        units = np.split(rows, np.cumsum(lens)[:-1]) if len(lens) else []
        batch = int(rng.integers(1, 12))
        n_batches = int(lens.sum()) // batch
        want, want_rest = _reference_pack(units, batch, n_batches)
        got, rest = pack_units(rows, lens.astype(np.int64), batch, n_batches)
        assert [b.tolist() for b in got] == want
        assert rest.tolist() == want_rest


def _blocks(sizes: list[int], grouped_every: int = 5) -> list[dict[str, np.ndarray]]:
    """Row blocks whose image rows encode their id; every few rows a group of three."""
    out, start = [], 0
    for n in sizes:
        ids = np.arange(start, start + n)
        group = np.full(n, -1)
        for g in range(0, n - 2, grouped_every):
            group[g : g + 3] = start + g
        image = np.broadcast_to((ids % 251).astype(np.uint8)[:, None, None, None], (n, 4, 4, 3))
        out.append({"id": ids, "group": group, "image": image, "view_ids": np.stack([ids, ids], 1)})
        start += n
    return out


def test_shuffle_buffer_moves_whole_rows_keeps_groups_and_bounded_slots() -> None:
    blocks = _blocks([3, 17, 40, 1, 25, 30, 12, 16])
    batch, capacity = 8, 32
    buf = ShuffleBuffer(batch, capacity, np.random.default_rng(0))
    got = []
    for b in blocks:
        got += list(buf.push(b))
        # slots: never more than the pool's bound (capacity + a batch + the largest block)
        assert len(buf.store["id"]) <= capacity + batch + 40
    got += list(buf.flush())
    ids = np.concatenate([b["id"] for b in got])
    assert sorted(ids.tolist()) == list(range(144)) and all(len(b["id"]) == batch for b in got)
    for b in got:
        np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["id"] % 251)
        np.testing.assert_array_equal(b["view_ids"][:, 1], b["id"])
    where = {int(i): k for k, b in enumerate(got) for i in b["id"]}
    for blk in blocks:
        for g in set(blk["group"][blk["group"] >= 0].tolist()):
            assert len({where[int(i)] for i in blk["id"][blk["group"] == g]}) == 1


def test_view_ids_name_the_image_behind_each_view() -> None:
    rng = np.random.default_rng(0)
    items = decode_rows(_table(), DecodeSpec("full", 32), rng)
    assert items["view_ids"].tolist() == [[10, 10], [11, 10], [12, 12], [13, 13]]
    assert decode_rows(_table(), DecodeSpec("bytes", 32), rng)["view_ids"].tolist()[1] == [11, 10]
    images = _table().drop_columns(["item_id", "image2", "image_id", "image2_id"])
    images = images.append_column("id", pa.array([5, 6, 7, 8], pa.int64()))
    assert decode_rows(images, DecodeSpec("eval", 32), rng)["view_ids"].tolist()[2] == [7, 7]
    old = _table().drop_columns(["image_id", "image2_id"])
    with pytest.raises(SeppError, match="predates image ids.*overwrite=true"):
        decode_rows(old, DecodeSpec("full", 32), rng)


def test_small_jpegs_decode_in_one_batch_as_pil_does_them() -> None:
    from PIL import Image

    t = _table(n=4, size=32, fmt="JPEG")
    out = decode_rows(t, DecodeSpec("full", 32), np.random.default_rng(0))
    for i, blob in enumerate(t["image"].to_pylist()):
        np.testing.assert_array_equal(out["image"][i], np.asarray(Image.open(io.BytesIO(blob))))
    np.testing.assert_array_equal(out["image2"][1], out["image"][0])  # the pair's positive
    with pytest.raises(SeppError, match="not uniform"):
        decode_rows(_table(size=40, fmt="JPEG"), DecodeSpec("full", 32), np.random.default_rng(0))


def test_decode_parts_equals_decoding_each_table() -> None:
    spec = DecodeSpec("crop", 16, view1=CropSpec(16), view2=CropSpec(8), max_positives=2)
    a, b = _table(), _table(n=3, fmt="JPEG")
    both = decode_parts([(a, np.random.default_rng(1)), (b, np.random.default_rng(2))], spec)
    one = decode_rows(a, spec, np.random.default_rng(1))
    two = decode_rows(b, spec, np.random.default_rng(2))
    assert both.keys() == one.keys()
    for k in both:
        np.testing.assert_array_equal(both[k], np.concatenate([one[k], two[k]]))


def test_read_ahead_follows_the_spare_cpus_within_bounds() -> None:
    assert auto_read_ahead(16, 1.0, 8 * 2**20) == 18
    assert auto_read_ahead(6, 2.0, 8 * 2**20) == 5
    assert auto_read_ahead(0, 1.0, 8 * 2**20) == 2  # a busy node still reads ahead
    assert auto_read_ahead(500, 1.0, 2**20) == 64
    assert auto_read_ahead(500, 1.0, 2**28) == 4  # 1 GiB in flight at most


def test_small_images_are_read_several_slices_a_task() -> None:
    slices = [Slice(Chunk(f"f{i}", 0, 256, "images"), 0, 256) for i in range(12)]
    small = task_groups(slices, DecodeSpec("full", 32))  # 6 KiB a row: ~1,400 rows a task
    assert [len(g) for g in small] == [6, 6] and [s for g in small for s in g] == slices
    big = DecodeSpec("crop", 224, view1=CropSpec(224), view2=CropSpec(224))
    assert [len(g) for g in task_groups(slices, big)] == [1] * 12


def _shards(root: Path, files: int = 3, per_file: int = 48) -> list[Chunk]:
    """Image shards of 8 px JPEGs (row groups of 16), and their chunks."""
    from sepp_ray.data.schema import IMAGE_SCHEMA

    chunks = []
    for f in range(files):
        ids = list(range(f * per_file + 1, (f + 1) * per_file + 1))
        t = pa.table(
            {
                "id": ids,
                "image": [encode(rgb(i, 8), "JPEG") for i in ids],
                "label": [i % 10 for i in ids],
                "split": ["train"] * per_file,
                "key": [str(i) for i in ids],
            },
            schema=IMAGE_SCHEMA,
        )
        path = root / f"part-{f}.parquet"
        pq.write_table(t, path, row_group_size=16)
        chunks += [Chunk(str(path), g, 16, "images") for g in range(per_file // 16)]
    return chunks


def _parts(chunks: list[Chunk], epochs: int, batch: int, steps: int) -> list[EpochPart]:
    return [
        EpochPart(e, rank_slices(chunks, 0, e, 1, 0, batch * steps), steps) for e in range(epochs)
    ]


def test_the_feed_stays_alive_across_epochs_in_the_same_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sepp_ray.train import feed

    chunks = _shards(tmp_path)
    spec, cfg = DecodeSpec("full", 8, split="train"), FeedConfig(16, buffer_rows=32)
    parts = _parts(chunks, 3, 16, 8)
    alone = [
        [b["id"].tolist() for b in rank_batches(p.slices, spec, cfg, 0, p.epoch, 0, 8, False)]
        for p in parts
    ]
    reads: list[int] = []
    next_epoch_read = threading.Event()
    real = feed.read_slices

    def spy(group: list[Slice], spec: DecodeSpec, seed: int, epoch: int) -> Batch:
        reads.append(epoch)
        if epoch == 1:
            next_epoch_read.set()
        return real(group, spec, seed, epoch)

    monkeypatch.setattr(feed, "read_slices", spy)
    stream = RankFeed(iter(parts), spec, cfg, seed=0, rank=0, use_ray=False)
    first = stream.epoch(0)
    seen = [next(first)["id"].tolist() for _ in range(7)]
    # epoch 0's last batch not yet taken: epoch 1's first read is already under way
    assert next_epoch_read.wait(10) and 1 in reads
    seen += [b["id"].tolist() for b in first]
    assert seen == alone[0]  # the order is the epoch's own, whatever ran ahead
    assert [[b["id"].tolist() for b in stream.epoch(e)] for e in (1, 2)] == alone[1:]
    assert alone[0] != alone[1]
    with pytest.raises(SeppError, match="past the feed's last planned epoch"):
        next(stream.epoch(3))


def test_a_consumer_may_stop_at_its_step_count_but_not_before(tmp_path: Path) -> None:
    """The training loop takes exactly `steps` batches and may never ask for the end marker
    (a loop cut into step segments): the next epoch still starts; an epoch left unfinished
    is an error, not a silent shift of the order."""
    chunks = _shards(tmp_path)
    spec, cfg = DecodeSpec("full", 8, split="train"), FeedConfig(16, buffer_rows=32)
    parts = _parts(chunks, 3, 16, 8)
    alone = [
        [b["id"].tolist() for b in rank_batches(p.slices, spec, cfg, 0, p.epoch, 0, 8, False)]
        for p in parts
    ]
    stream = RankFeed(iter(parts), spec, cfg, seed=0, rank=0, use_ray=False)
    first = stream.epoch(0)
    assert [next(first)["id"].tolist() for _ in range(8)] == alone[0]  # no 9th next()
    second = stream.epoch(1)
    assert [next(second)["id"].tolist() for _ in range(7)] == alone[1][:7]
    with pytest.raises(SeppError, match="read them in order"):
        next(stream.epoch(2))  # epoch 1's last batch was never taken


def test_the_feed_reads_in_ray_tasks_as_locally_across_epochs(
    tmp_path: Path, ray_cluster: str
) -> None:
    chunks = _shards(tmp_path)
    spec, cfg = DecodeSpec("full", 8, split="train"), FeedConfig(16, buffer_rows=32)
    parts = _parts(chunks, 2, 16, 9)
    local = RankFeed(parts, spec, cfg, seed=0, rank=0, use_ray=False)
    remote = RankFeed(parts, spec, cfg, seed=0, rank=0, use_ray=True)
    for e in (0, 1):
        a, b = list(local.epoch(e)), list(remote.epoch(e))
        assert len(a) == 9 and [x["id"].tolist() for x in a] == [x["id"].tolist() for x in b]
        assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    assert remote.reader.read_ahead >= 2  # sized from the node's spare CPUs (auto)
