"""`sepp pipeline` end to end on synthetic data: every arm at the plain run's optimizer steps,
reuse of complete stages; the arms' pairs, the per-arm statistics and the budget as functions."""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sepp_ray.config import load
from sepp_ray.errors import SeppError
from sepp_ray.flow.pipeline import ARMS, PipelineConfig, arm_pairs, run_pipeline, summarize
from sepp_ray.storage import read_manifest
from sepp_ray.train.budget import epochs_for, plain_steps, planned_items
from tests.test_remine_run import check_sp_remine


@pytest.mark.usefixtures("ray_cluster")
def test_every_arm_takes_the_plain_runs_steps_and_a_rerun_reuses_every_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a relative work folder, as `make run` gives: Ray Train workers do not share the driver's
    # working directory, so every stage must resolve it where the driver does
    monkeypatch.chdir(tmp_path)
    overrides = [
        "source=synthetic",
        "work=work",
        "source_options.n=120",
        "source_options.size=16",
        "arms=[plain,ap,sp,sp-remine]",
        "remine_every=1",
        "seeds=1",
        "bootstrap_epochs=2",  # = pretrain.epochs
        "pretrain.backbone=test_resnet",
        "pretrain.epochs=2",
        "pretrain.batch_size=24",
        "pretrain.warmup_epochs=0",
        "pretrain.report_every_steps=1",  # the learning rate of every step in the history
        "pretrain.keep_checkpoints=0",  # epoch 1's checkpoint: sp-remine's round 2 came from it
        "pretrain.knn_k=20",
        "pretrain.cpus_per_worker=0.5",
        "pretrain.shuffle_buffer=0",
        "mining.lo=-1",
        "mining.hi=0.9999",
        "mining.k=20",
        "mining.m=1",  # one positive per anchor: 20 pairs
        "protocols=knn",
    ]
    cfg = load(PipelineConfig, None, overrides)
    first = run_pipeline(cfg)
    report = Path(first["report"]).read_text()
    assert "## Accuracy per arm" in report and "pairs: 20 for 20 of 20 anchors" in report
    runs = {"plain-seed0", "ap-seed0", "sp-seed0", "sp-remine-seed0"}
    assert set(first["timings"]) == {"data", "bootstrap", "pairs", "eval"} | runs
    assert (tmp_path / "work" / "report" / "pairs_grid.png").exists()
    # the bootstrap run is as long as the plain run and equal to it: trained once, reused
    assert first["reused"] == ["plain-seed0"]
    # equal compute: the pair arms have 20 more items, yet take the plain run's steps
    manifests = {
        r["arm"]: read_manifest(str(Path(r["checkpoint"]).parent.parent)) for r in first["runs"]
    }
    data = read_manifest(next(str(p) for p in (tmp_path / "work").glob("data-*")))
    budget = plain_steps(data, "train", 24, 2)
    n = data["splits"]["train"]["total"]
    assert manifests["sp"]["items"]["semantic"] == manifests["ap"]["items"]["augmentation"] == 20
    assert (n + 20) // 24 > n // 24  # without the budget, the pair arms would step more
    for arm, m in manifests.items():
        assert m["budget_steps"] == budget and m["total_steps"] == budget, arm
    assert {r["total_steps"] for r in first["runs"]} == {budget}
    # no view of an image was a negative of a view of the same image, in any arm (the count
    # is a run metric), and the pairs used are counted: pair items only in the pair arms
    assert all(m["same_image_negatives"] == 0 for m in manifests.values())
    assert manifests["plain"]["pair_items"] == 0
    assert 0 < manifests["sp"]["pair_items"] <= 40 and 0 < manifests["ap"]["pair_items"] <= 40
    assert all(m["data_plane"]["mode"] == "resident" for m in manifests.values())
    for arm in ("plain", "ap", "sp", "sp-remine"):
        assert f"| {arm} | 1 |" in report and f"| {arm} | 0 |" in report
    check_sp_remine(manifests["sp-remine"], manifests["sp"], report, tmp_path)
    # every run evaluated, on the test split, once
    assert all(0.0 <= r["knn"] <= 1.0 for r in first["runs"])
    second = run_pipeline(load(PipelineConfig, None, overrides))
    assert sorted(second["reused"]) == sorted(first["timings"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["protocols=knn,lineer"], "unknown protocol"),
        (["arms=[plain,sp,spp]"], "unknown arm"),
        (["arms=[ap,sp]"], "must include plain"),
        (["arms=[plain,sp,sp]"], "listed twice"),
        (["arms=[plain,curated]"], "curated=TABLE"),
        (["seeds=0"], "seeds"),
        (["remine_every=2"], "add sp-remine to arms"),
        (["arms=[plain,sp-remine]", "pretrain.epochs=1"], "no round would re-mine"),
        (["pretrain.method=byol", "arms=[plain,cancel]"], "byol"),
        (["pretrain.method=simclr2"], "simclr2"),
        (["mining.lo=1.5"], "lo"),
    ],
)
def test_bad_settings_fail_before_any_stage_runs(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    cfg = load(PipelineConfig, None, ["source=synthetic", f"work={tmp_path / 'w'}", *overrides])
    with pytest.raises(SeppError, match=message):
        run_pipeline(cfg)
    assert not (tmp_path / "w").exists()


def test_each_arm_uses_the_pairs_its_own_way() -> None:
    c = load(PipelineConfig, None, ["arms=[plain,sp-remine]", "pretrain.epochs=8"])
    got = {arm: arm_pairs(arm, "P", "C", c) for arm in ARMS}
    assert got["plain"].mode == "none" and got["plain"].pairs is None
    assert (got["ap"].pairs, got["ap"].mode, got["ap"].augmentation_pairs) == ("P", "dataset", True)
    assert (got["sp"].pairs, got["sp"].mode, got["sp"].augmentation_pairs) == (
        "P",
        "dataset",
        False,
    )
    assert (got["multi_positive"].pairs, got["multi_positive"].mode) == ("P", "multi_positive")
    assert (got["cancel"].pairs, got["cancel"].mode) == ("P", "cancel")
    assert (got["curated"].pairs, got["curated"].curated) == (None, "C")
    assert got["curated"].mode == "dataset"
    # sp: mined once; sp-remine: the same pairs, re-mined every quarter of the run by default
    remine = got["sp-remine"]
    assert (remine.pairs, remine.mode, remine.augmentation_pairs) == ("P", "dataset", False)
    assert got["sp"].remine_every is None and remine.remine_every == 2
    every = arm_pairs("sp-remine", "P", None, replace(c, remine_every=3)).remine_every
    assert every == 3


def _rows(arm: str, knn: dict[int, float]) -> list[dict[str, Any]]:
    return [{"arm": arm, "seed": s, "knn": v, "linear": None} for s, v in knn.items()]


def test_the_summary_gives_mean_spread_and_the_paired_difference_to_plain() -> None:
    plain = {0: 0.50, 1: 0.60, 2: 0.70}
    sp = {0: 0.52, 1: 0.63, 2: 0.71}  # each seed a little above its own plain run
    ap = {0: 0.60, 1: 0.70}  # seed 2 missing: paired over seeds 0 and 1 only
    out = summarize(
        _rows("plain", plain) + _rows("sp", sp) + _rows("ap", ap), ["plain", "sp", "ap"]
    )
    knn = out["sp"]["knn"]
    assert knn["n"] == 3 and knn["mean"] == pytest.approx(statistics.fmean(sp.values()))
    assert knn["std"] == pytest.approx(statistics.stdev(sp.values()))
    diff = knn["diff"]
    assert diff["mean"] == pytest.approx(0.02) and diff["n"] == 3
    # paired: the spread of the per-seed differences, far below the spread over seeds
    assert diff["std"] == pytest.approx(statistics.stdev([0.02, 0.03, 0.01]))
    assert diff["std"] < knn["std"] / 5
    assert out["ap"]["knn"]["diff"]["mean"] == pytest.approx(0.10)
    assert out["ap"]["knn"]["diff"]["n"] == 2
    assert out["plain"]["knn"]["diff"] is None
    assert out["sp"]["linear"] == {
        "n": 0,
        "mean": None,
        "std": None,
        "diff": {"n": 0, "mean": None, "std": None},
    }


def test_the_budget_is_the_plain_runs_steps() -> None:
    data = {"splits": {"train": {"total": 1000}, "val": {"total": 50}}}
    assert plain_steps(data, "train", 128, 10) == 7 * 10
    with pytest.raises(SeppError, match="exceeds the 1000 images"):
        plain_steps(data, "train", 2048, 1)
    with pytest.raises(SeppError, match="'unlabeled' not in the dataset"):
        plain_steps(data, "unlabeled", 128, 1)
    # 500 semantic pairs as items: 11 steps an epoch, so 70 steps are 7 epochs, the last short
    assert (
        planned_items(1000, 500, "dataset") == 1500 and planned_items(1000, 500, "cancel") == 1000
    )
    assert epochs_for(70, 1500 // 128) == 7 and epochs_for(70, 7) == 10


def _fake_stages(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Stand-ins for the training and mining stages that record what they were asked."""
    import sepp_ray.flow.pipeline as pipeline

    calls: list[tuple[str, Any]] = []

    def train(st: Any, name: str, base: Any, *args: Any, **kw: Any) -> tuple[str, dict]:
        calls.append((name, base.seed))
        return "run", {"final_checkpoint": f"ckpt-seed{base.seed}", "total_steps": 30}

    def mine(st: Any, data: Any, fp: Any, sampler: str, mining: Any, split: str, name: str) -> Any:
        calls.append((name, (sampler, mining.seed, mining.m)))
        pairs = {"num_pairs": 5, "anchors_with_positive": 5, "k": 5, "lo": 0.9, "hi": 0.99}
        return f"pairs-{sampler}-{mining.seed}", {**pairs, "encoder": {"identity": sampler}}

    monkeypatch.setattr(pipeline, "train_stage", train)
    monkeypatch.setattr(pipeline, "mine_stage", mine)
    return calls


def test_sampler_per_seed_bootstraps_and_mines_again_for_each_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sepp_ray.flow.pipeline import samplers
    from sepp_ray.flow.pipeline_report import sampler_lines

    calls = _fake_stages(monkeypatch)
    cfg = load(PipelineConfig, None, ["seeds=3", "pretrain.seed=7", "sampler_per_seed=true"])
    found = samplers(None, cfg, "data", "fp", 30)  # type: ignore[arg-type]
    assert sorted(found) == [7, 8, 9]
    # each seed: its own plain bootstrap run, then its own mining (anchors seeded per sampler)
    assert calls[0::2] == [("bootstrap-seed7", 7), ("bootstrap-seed8", 8), ("bootstrap-seed9", 9)]
    assert calls[1::2] == [
        ("pairs-seed7", ("ckpt-seed7", 0, 4)),  # bootstrapped: 4 positives per anchor at most
        ("pairs-seed8", ("ckpt-seed8", 1, 4)),
        ("pairs-seed9", ("ckpt-seed9", 2, 4)),
    ]
    assert len({x.pairs_uri for x in found.values()}) == 3
    text = "\n".join(sampler_lines(cfg, found))
    assert "one per seed (bootstrapped and pairs mined again per seed)" in text
    assert "3 plain run(s) of 30 optimizer steps, 90 in all, outside the arms' budget" in text
    assert "pairs (seed 8): 5 for 5 of 5 anchors" in text


def test_one_sampler_serves_every_seed_by_default_and_a_given_one_is_not_capped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sepp_ray.flow.pipeline import samplers
    from sepp_ray.flow.pipeline_report import sampler_lines

    calls = _fake_stages(monkeypatch)
    cfg = load(PipelineConfig, None, ["seeds=2", "mining.m=9"])
    found = samplers(None, cfg, "data", "fp", 30)  # type: ignore[arg-type]
    assert calls == [("bootstrap", 0), ("pairs", ("ckpt-seed0", 0, 9))]  # an explicit m wins
    assert found[0] is found[1]
    text = "\n".join(sampler_lines(cfg, found))
    assert "one for every seed, mined once: the spread over seeds leaves the sampler's out" in text
    assert "1 plain run(s) of 30 optimizer steps, 30 in all" in text
    calls.clear()
    given = load(
        PipelineConfig, None, ["seeds=2", "sampler_checkpoint=ck", "sampler_per_seed=true"]
    )
    found = samplers(None, given, "data", "fp", 30)  # type: ignore[arg-type]
    assert calls == [("pairs-seed0", ("ck", 0, None)), ("pairs-seed1", ("ck", 1, None))]
    assert "bootstrap: none" in "\n".join(sampler_lines(given, found))
    assert samplers(None, load(PipelineConfig, None, ["arms=[plain]"]), "d", "f", 1) == {}  # type: ignore[arg-type]
