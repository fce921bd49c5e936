"""Re-mining rounds on one rank, without Ray: a round is mined from the weights in training,
written as a complete pairs result and read back; a complete round is reused, a half-written
one mined again, a round that cannot be mined leaves its reason; settings that cannot apply
are refused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sepp_ray.errors import SeppError
from sepp_ray.methods import create_method
from sepp_ray.mining.mine import MineConfig
from sepp_ray.storage import begin_write, finish_write, read_manifest
from sepp_ray.train.config import PretrainConfig
from sepp_ray.train.items import PairsConfig, plan_items
from sepp_ray.train.remine import (
    ROUND_FAILED,
    RemineSpec,
    check_round_failed,
    mining_config_of,
    resolve_encoder,
    round_uri,
)
from sepp_ray.train.remine_round import Rounds, encoder_of
from sepp_ray.train.remine_targets import ResidentTarget, square_uint8
from sepp_ray.train.resident import PlaneChoice, ResidentFeed, ResidentItems, ResidentPlan

N, SIZE = 60, 16


def _first_pairs(tmp_path: Path, **mining: object) -> str:
    """A sampler's pairs result: its manifest records the mining config later rounds reuse."""
    cfg = MineConfig(**{"lo": -1.0, "hi": 0.9999, "k": 12, "m": 1, **mining})  # type: ignore[arg-type]
    loc = begin_write(str(tmp_path / "sampler-pairs"))
    rows = {"anchor_id": [0, 2], "positive_id": [1, 3], "similarity": [0.9, 0.8], "rank": [1, 1]}
    import pyarrow as pa

    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(rows), buf)
    loc.write_bytes("pairs/part-00000.parquet", buf.getvalue().to_pybytes())
    finish_write(
        loc,
        {
            "kind": "pairs",
            "config": vars(cfg),
            "num_pairs": 2,
            "files": {"pairs": "pairs/part-00000.parquet"},
            "precision": {"overall": 0.5},
        },
    )
    return loc.uri


def _feed(seed: int = 0, device: str = "cpu") -> ResidentFeed:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    part = {"id": np.arange(N, dtype=np.int64), "label": np.arange(N) % 4, "image": images}
    plan = plan_items(None, None, PairsConfig(mode="none"), 0)
    items = ResidentItems.of(plan, 1)
    return ResidentFeed(
        ResidentPlan(
            refs=[part],
            shape=(SIZE, SIZE),
            images=N,
            items=items,
            global_batch=8,
            steps_per_epoch=N // 8,
            total_steps=3 * (N // 8),
            seed=0,
            choice=PlaneChoice("resident", "test", N * SIZE * SIZE * 3),
        ),
        device,
    )


def _spec(first: str, **kw: object) -> RemineSpec:
    base = dict(
        every=2,
        encoder="online",
        mining=mining_config_of(first),
        pairs=PairsConfig(pairs=first, remine_every=2),
        first_pairs=first,
        dataset="memory://test",
        split="train",
        classes=["a", "b", "c", "d"],
        seed=0,
    )
    base.update(kw)
    return RemineSpec(**base)  # type: ignore[arg-type]


def _method(seed: int = 0, name: str = "simclr") -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_method(name, backbone="test_resnet", cifar_stem=True)


NORM = (torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25))


def _rounds(spec: RemineSpec, out: Path, method: torch.nn.Module, feed: ResidentFeed) -> Rounds:
    target = ResidentTarget(feed, spec)
    return Rounds(spec, str(out), target, method, NORM, SIZE)  # type: ignore[arg-type]


def _pairs_of(uri: str) -> list[tuple[int, int]]:
    m = read_manifest(uri)
    t = pq.read_table(str(Path(uri) / m["files"]["pairs"]))
    return list(zip(t["anchor_id"].to_pylist(), t["positive_id"].to_pylist(), strict=True))


def test_rounds_count_from_one_each_every_epochs(tmp_path: Path) -> None:
    spec = _spec(_first_pairs(tmp_path))
    assert [spec.round_of(e) for e in range(6)] == [1, 1, 2, 2, 3, 3]
    assert [spec.start_of(r) for r in (1, 2, 3)] == [0, 2, 4]
    assert round_uri("/x", 2).endswith("rounds/round-002")


def test_a_round_is_mined_written_and_read_back(tmp_path: Path) -> None:
    first = _first_pairs(tmp_path)
    spec, out, feed = _spec(first), tmp_path / "run", _feed()
    rounds = _rounds(spec, out, _method(), feed)
    before = feed.row_b.clone()
    assert rounds.before_epoch(0) and rounds.before_epoch(1)  # round 1: the sampler's items
    assert rounds.current == 1 and not (out / "rounds").exists()
    assert rounds.before_epoch(2)
    m = read_manifest(round_uri(str(out), 2))
    assert m["kind"] == "pairs" and m["round"] == 2 and m["start_epoch"] == 2
    assert m["num_pairs"] == 12 and m["k"] == 12 and m["n"] == N  # m=1: one pair per anchor
    assert m["config"]["lo"] == -1.0 and m["remined_from"] == first  # the first pairs' config
    assert m["encoder_from"] == "online" and m["encoder_checkpoint_epoch"] == 2
    assert 0.0 <= m["precision"]["overall"] <= 1.0  # labels known: precision measured
    # the feed now trains on the round's pairs: 60 originals + 12 pair items, cycled to fill
    # the plan's epoch
    assert rounds.current == 2 and feed.cycle and len(feed.row_b) == N + 12
    pairs = _pairs_of(round_uri(str(out), 2))
    assert all(a != p for a, p in pairs)
    assert sorted(feed.row_b[N:].tolist()) == sorted(p for _, p in pairs)
    assert len(before) == N
    batches = list(feed.batches(2, 1, 0))
    assert len(batches) == N // 8


def test_the_same_weights_mine_the_same_pairs_and_other_weights_others(tmp_path: Path) -> None:
    first = _first_pairs(tmp_path)
    spec = _spec(first)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert _rounds(spec, tmp_path / name, _method(seed), _feed()).before_epoch(2)
    a, b, c = (_pairs_of(round_uri(str(tmp_path / n), 2)) for n in "abc")
    assert a == b
    assert a != c


def test_a_complete_round_is_reused_and_a_half_written_one_mined_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _first_pairs(tmp_path)
    spec = _spec(first)
    ref = tmp_path / "ref"
    assert _rounds(spec, ref, _method(), _feed()).before_epoch(2)
    expected = _pairs_of(round_uri(str(ref), 2))
    # a crash mid-round: the folder holds a pairs file, no manifest
    half = begin_write(round_uri(str(tmp_path / "crashed"), 2))
    half.write_bytes("pairs/part-00000.parquet", b"truncated")
    assert _rounds(spec, tmp_path / "crashed", _method(), _feed()).before_epoch(2)
    assert _pairs_of(half.uri) == expected
    # complete: read back, never mined again (whatever the weights now are)
    import sepp_ray.train.remine_round as remine

    def no_mining(*a: object, **k: object) -> None:
        raise AssertionError("a complete round was mined again")

    monkeypatch.setattr(remine, "mine_round", no_mining)
    feed = _feed()
    assert _rounds(spec, ref, _method(seed=7), feed).before_epoch(3)  # resumed inside round 2
    assert sorted(feed.row_b[N:].tolist()) == sorted(p for _, p in expected)


def test_resuming_inside_a_round_whose_pairs_are_gone_is_refused(tmp_path: Path) -> None:
    spec = _spec(_first_pairs(tmp_path))
    with pytest.raises(SeppError, match="round 2's pairs .* missing.*epoch 3"):
        _rounds(spec, tmp_path / "run", _method(), _feed()).before_epoch(3)


def test_a_round_with_too_many_pairs_stops_the_run_with_the_reason(tmp_path: Path) -> None:
    first = _first_pairs(tmp_path, max_pairs=5)  # 12 anchors x 1 pair > 5
    out = tmp_path / "run"
    assert not _rounds(_spec(first), out, _method(), _feed()).before_epoch(2)
    assert not (out / "rounds" / "round-002" / "manifest.json").exists()
    assert json.loads((out / ROUND_FAILED).read_text())["round"] == 2
    with pytest.raises(SeppError, match="round 2 failed: .*more than 5 pairs"):
        check_round_failed(str(out))
    assert not (out / ROUND_FAILED).exists()


def test_the_momentum_encoder_where_the_method_has_one(tmp_path: Path) -> None:
    moco, simclr = _method(name="mocov2"), _method(name="simclr")
    assert resolve_encoder("auto", "momentum_backbone") == "momentum"
    assert resolve_encoder("auto", None) == "online"
    assert encoder_of(moco, "momentum") is moco.momentum_backbone  # type: ignore[arg-type]
    assert encoder_of(moco, "online") is moco.backbone  # type: ignore[arg-type]
    with pytest.raises(SeppError, match="no momentum encoder"):
        encoder_of(simclr, "momentum")  # type: ignore[arg-type]
    # a momentum round embeds with the momentum weights: different weights, different pairs
    first = _first_pairs(tmp_path)
    with torch.no_grad():
        for p in moco.momentum_backbone.parameters():  # type: ignore[union-attr]
            p.add_(torch.randn_like(p))
    for which in ("momentum", "online"):
        spec = _spec(first, encoder=which)
        assert _rounds(spec, tmp_path / which, moco, _feed()).before_epoch(2)
    assert _pairs_of(round_uri(str(tmp_path / "momentum"), 2)) != _pairs_of(
        round_uri(str(tmp_path / "online"), 2)
    )


def test_images_are_squared_and_resized_for_the_encoder() -> None:
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12).to(torch.uint8)
    assert square_uint8(x, 8) is not x and square_uint8(x, 8).shape == (2, 3, 8, 8)
    assert torch.equal(square_uint8(x, 8), x[..., :, 2:10])  # the central square, no resize
    assert square_uint8(x, 4).shape == (2, 3, 4, 4) and square_uint8(x, 4).dtype == torch.uint8
    same = x[..., :8, :8].contiguous()
    assert square_uint8(same, 8) is same


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        (PairsConfig(remine_every=2), "needs pairs.pairs"),
        (PairsConfig(pairs="p", mode="none", remine_every=2), "mode=none"),
        (PairsConfig(pairs="p", augmentation_pairs=True, remine_every=2), "augmentation pairs"),
        (PairsConfig(pairs="p", remine_every=0), "remine_every must be >= 1"),
        (PairsConfig(pairs="p", remine_every=2, remine_encoder="teacher"), "remine_encoder"),
    ],
)
def test_re_mining_that_cannot_apply_is_refused(pairs: PairsConfig, match: str) -> None:
    with pytest.raises(SeppError, match=match):
        pairs.validate()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"epochs": 2}, "no round would re-mine"),
        ({"pairs": {"remine_encoder": "momentum"}}, "simclr has no momentum encoder"),
    ],
)
def test_a_run_that_cannot_re_mine_is_refused_before_it_starts(kw: dict, match: str) -> None:
    pairs = PairsConfig(pairs="p", remine_every=2, **kw.pop("pairs", {}))
    cfg = PretrainConfig(dataset="d", out="o", epochs=kw.pop("epochs", 4), pairs=pairs, **kw)
    with pytest.raises(SeppError, match=match):
        cfg.validate()


def test_a_momentum_method_may_re_mine_with_its_momentum_encoder() -> None:
    pairs = PairsConfig(pairs="p", remine_every=2, remine_encoder="momentum")
    PretrainConfig(dataset="d", out="o", method="mocov2", epochs=4, pairs=pairs).validate()


def test_an_epoch_cycles_a_round_s_items_only_when_asked() -> None:
    from sepp_ray.train.resident import epoch_index

    unit = np.arange(10, dtype=np.int64)
    with pytest.raises(SeppError, match="exceed"):
        epoch_index(unit, 0, 0, 1, 0, 4, 4)
    order = epoch_index(unit, 0, 0, 1, 0, 4, 4, cycle=True)  # 16 draws of 10 items
    counts = np.bincount(order.ravel(), minlength=10)
    assert order.shape == (4, 4) and counts.min() >= 1 and counts.max() <= 2
    # where the items fill the epoch, cycling changes nothing
    assert np.array_equal(
        epoch_index(unit, 0, 3, 1, 0, 2, 4), epoch_index(unit, 0, 3, 1, 0, 2, 4, cycle=True)
    )
    grouped = np.array([0, 0, 1, 1, 2, 3, 4, 5], np.int64)  # two groups of two, four singles
    g = epoch_index(grouped, 1, 0, 1, 0, 3, 4, cycle=True)
    assert g.shape == (3, 4)


def test_the_first_pairs_must_carry_their_mining_config(tmp_path: Path) -> None:
    loc = begin_write(str(tmp_path / "notpairs"))
    finish_write(loc, {"kind": "images"})
    with pytest.raises(SeppError, match="not a pairs result"):
        mining_config_of(loc.uri)
    assert replace(mining_config_of(_first_pairs(tmp_path)), seed=3).k == 12


def test_a_round_mined_with_other_settings_is_refused_on_resume(tmp_path: Path) -> None:
    first = _first_pairs(tmp_path)
    out = tmp_path / "run"
    assert _rounds(_spec(first), out, _method(), _feed()).before_epoch(2)
    with pytest.raises(SeppError, match="round 2's pairs .* other settings .*epoch 2.*epoch 3"):
        _rounds(_spec(first, every=3), out, _method(), _feed()).before_epoch(3)


def test_a_streamed_epoch_cycles_its_chunks_only_when_asked() -> None:
    from sepp_ray.train.plan import Chunk, rank_slices

    chunks = [Chunk("a", g, 10, "images") for g in range(3)] + [Chunk("i", 0, 4, "items")]
    with pytest.raises(SeppError, match="exceed the 34 training rows"):
        rank_slices(chunks, 0, 0, 2, 0, 20)
    got = [rank_slices(chunks, 0, 0, 2, r, 20, cycle=True) for r in (0, 1)]
    assert [sum(s.stop - s.start for s in g) for g in got] == [20, 20]  # 40 rows from 34
    # where the chunks fill the epoch, cycling changes nothing
    assert rank_slices(chunks, 0, 1, 2, 1, 15) == rank_slices(chunks, 0, 1, 2, 1, 15, cycle=True)


@pytest.mark.gpu
def test_a_round_on_a_cuda_device_embeds_and_searches_there(tmp_path: Path) -> None:
    """The GPU path: the split on the device, bf16 features, the torch search on the device's
    keys. bf16 moves near-ties, so the same anchors and counts are asserted, not the pairs."""
    first = _first_pairs(tmp_path)
    spec = _spec(first)
    assert _rounds(spec, tmp_path / "cpu", _method(), _feed()).before_epoch(2)
    feed = _feed(device="cuda")
    norm = (NORM[0].cuda(), NORM[1].cuda())
    method = _method().cuda()
    rounds = Rounds(spec, str(tmp_path / "gpu"), ResidentTarget(feed, spec), method, norm, SIZE)  # type: ignore[arg-type]
    assert rounds.before_epoch(2)
    cpu, gpu = (read_manifest(round_uri(str(tmp_path / w), 2)) for w in ("cpu", "gpu"))
    assert gpu["num_pairs"] == cpu["num_pairs"] == 12 and gpu["k"] == cpu["k"]
    anchors = {a for a, _ in _pairs_of(round_uri(str(tmp_path / "gpu"), 2))}
    assert anchors == {a for a, _ in _pairs_of(round_uri(str(tmp_path / "cpu"), 2))}
    assert feed.row_a.device.type == "cuda" and len(feed.row_b) == N + 12
