"""`sepp sweep` on the session's Ray cluster: a tiny ASHA sweep on synthetic data, a driver
killed mid-sweep that a rerun restores and completes, and bad search spaces; selection reads
the validation split only."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sepp_ray.config import load
from sepp_ray.errors import SeppError
from sepp_ray.storage import read_manifest
from sepp_ray.tune.report import ranked
from sepp_ray.tune.space import SweepConfig
from sepp_ray.tune.sweep import _check_monitor, run_sweep


def _overrides(out: Path | str, *extra: str) -> list[str]:
    return [
        "source=synthetic",
        f"out={out}",
        "source_options.n=120",
        "source_options.size=16",
        "bootstrap_epochs=1",
        "pretrain.backbone=test_resnet",
        "pretrain.epochs=2",
        "pretrain.batch_size=32",
        "pretrain.warmup_epochs=0",
        "pretrain.knn_k=20",
        "pretrain.knn_every=1",
        "pretrain.checkpoint_every=1",
        "pretrain.cpus_per_worker=0.5",
        "pretrain.shuffle_buffer=0",
        "mining.hi=0.9999",
        "mining.k=20",
        "mining.m=1",  # one positive per anchor: 20 pairs
        "grace_period=1",
        "max_concurrent=1",
        *extra,
    ]


def _free_cpus(expected: float, timeout: float = 30.0) -> float:
    import ray

    deadline = time.time() + timeout
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= expected or time.time() > deadline:
            return float(free)
        time.sleep(0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, ray_cluster: str) -> tuple[Path, dict]:
    import torch

    from sepp_ray.models.backbones import create_backbone
    from sepp_ray.models.checkpoint import BackboneMeta, save_backbone

    base = tmp_path_factory.mktemp("sweep")
    # a given sampler (a seeded random encoder), so no bootstrap run: the slow test bootstraps
    torch.manual_seed(0)
    model, dim = create_backbone("test_resnet", cifar_stem=True)
    save_backbone(str(base / "sampler"), model, BackboneMeta("test_resnet", True, dim, 16))
    # K changes the pair items and so the epoch's length: of 100 train images at batch 20, 4
    # pairs keep the plain run's 5-step epoch, 20 pairs make it 6 steps. Both trials report at
    # the plain run's steps; metric=epoch (data epochs done at a report) makes ASHA's choice
    # predictable: at the grace period the longer-epoch trial has done fewer epochs and stops.
    # no final evaluation here (the slow test has one): the monitor's last kNN is the accuracy
    extra = (
        "space.k=[4,20]",
        "metric=epoch",
        "pretrain.batch_size=20",
        f"sampler_checkpoint={base / 'sampler'}",
        "protocols=[]",
    )
    return base / "out", run_sweep(load(SweepConfig, None, _overrides(base / "out", *extra)))


def test_a_tiny_asha_sweep_ranks_stops_caches_and_reports(
    tiny: tuple[Path, dict[str, Any]],
) -> None:
    out, r = tiny
    rows = r["rows"]
    assert [row["k"] for row in rows] == [4, 20]
    m = read_manifest(str(out))
    spe = m["budget_steps"] // 2  # the plain run's epoch: every trial's report interval
    assert m["scheduler"]["report_every_steps"] == spe == 5
    runs = [read_manifest(row["out"]) if row["status"] == "done" else None for row in rows]
    # the trials' epochs differ in length, yet ASHA saw both at the same optimizer steps
    lengths = [(r or {}).get("steps_per_epoch") for r in runs]
    assert lengths[0] == spe and rows[1]["total_steps"] == m["budget_steps"]
    assert [h["step"] for h in rows[0]["history"]] == [spe, 2 * spe]
    assert [h["step"] for h in rows[1]["history"]] == [spe]
    assert rows[1]["history"][0]["epoch"] == pytest.approx(spe / 6, abs=1e-3)  # 6-step epochs
    # ASHA's rule replayed on what Tune saw (trials ran one at a time, in this order): a trial
    # stops at the grace period when its metric is below the median of the earlier trials'
    seen: list[float] = []
    for row in rows:
        at_grace = next(h["epoch"] for h in row["history"] if h["step"] == spe)
        stop = bool(seen) and at_grace < float(np.percentile(seen, 50))
        assert row["stopped_early"] is stop and row["steps_run"] == (spe if stop else 2 * spe)
        seen.append(at_grace)
    assert [row["status"] for row in rows] == ["done", "stopped"]
    # the finished trial wrote its manifest; the stopped one was judged inside its first
    # epoch, before any checkpoint of it
    assert runs[0] is not None and runs[0]["epochs"] == 2
    assert rows[1]["epochs_run"] == 0 and rows[1]["checkpoint"] is None
    # the stopped trial's run was aborted, not abandoned: its workers' CPUs are free again
    assert _free_cpus(2.0) == 2.0
    # (metric=lr here reads no split; a kNN metric reads val: the monitor test below)
    assert m["scheduler"]["time_attr"] == "step" and m["scheduler"]["split"] is None
    assert read_manifest(rows[0]["out"])["total_steps"] == m["budget_steps"]
    # one mining per sampler config (K differs)
    assert (
        len(glob.glob(str(out / "pairs-*"))) == 2 and rows[0]["pairs_uri"] != rows[1]["pairs_uri"]
    )
    assert [row["pairs"] for row in rows] == [4, 20] and 0.0 <= rows[1]["precision"] <= 1.0
    for row in rows:
        assert row["eval"] == {} and row["top1"] == row["history"][-1]["knn_top1"]
    summary = (out / "summary.md").read_text()
    assert all(f"| {row['trial']} |" in summary for row in rows)
    assert "read epoch on the 'train' split" in summary  # not a val metric
    assert "1 stopped early by ASHA" in summary
    for png in ("acc_vs_threshold.png", "acc_vs_k.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["rows"][1]["trial"] == rows[1]["trial"]
    assert m["kind"] == "sweep" and m["restored"] is False
    # the grace period is given in plain-run epochs and applied in optimizer steps
    assert m["scheduler"]["name"] == "ASHA" and m["scheduler"]["grace_period_epochs"] == 1
    assert m["scheduler"]["grace_period"] == spe
    # Tune's TensorBoard logs, one event file per trial, for the dashboard
    assert len(glob.glob(f"{r['experiment']}/*/events.out.tfevents.*")) == 2
    # Tune saw each trial's reported checkpoints: the finished trial's best names its run's
    # newest checkpoint; the stopped one, judged inside its first epoch, has none
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(r["experiment"])
    trials = {Path(t.path).name: t for t in analysis.trials}
    for row in rows:
        best = analysis.get_best_checkpoint(trials[row["trial"]], metric="epoch", mode="max")
        if row["status"] == "stopped":
            assert best is None
            continue
        with best.as_directory() as d:
            named = json.loads((Path(d) / "run_checkpoint.json").read_text())["uri"]
        assert named == row["checkpoint"] and named.endswith("epoch-00002")


DRIVER = """
import sys
from ray.data import DataContext
from sepp_ray.config import load
from sepp_ray.tune.space import SweepConfig
from sepp_ray.tune.sweep import run_sweep
DataContext.get_current().enable_progress_bars = False
run_sweep(load(SweepConfig, None, sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_driver_killed_mid_sweep_on_object_storage_is_restored_and_completes(
    tiny: tuple[Path, dict[str, Any]], ray_cluster: str, bucket: str, tmp_path: Path
) -> None:
    from sepp_ray.storage import filesystem

    first, _ = tiny
    data = glob.glob(str(first / "data-*"))[0]
    out = f"{bucket}/sweep"
    fs, root = filesystem(out)
    args = _overrides(
        out,
        f"source={data}",  # ingested already: used as is; the sampler is bootstrapped
        "pretrain.epochs=3",
        "space.lo=[-1.0,0.5]",
    )

    def found(pattern: str) -> list[str]:
        fs.invalidate_cache()
        return list(fs.glob(f"{root}/{pattern}"))

    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    with open(tmp_path / "driver.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, *args], env=env, stdout=log, stderr=log
        )
        # kill once the first trial has reported an epoch and Tune has saved its state
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if found("trials/*/checkpoints/epoch-00001/manifest.json") and found(
                "tune/sweep-*/experiment_state-*.json"
            ):
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        proc.kill()
        proc.wait()
    assert not found("manifest.json")
    with fs.open(found("tune/sweep-*/experiment_state-*.json")[0], "r") as f:
        before = {json.loads(t[0])["trial_id"] for t in json.load(f)["trial_data"]}
    r = run_sweep(load(SweepConfig, None, args))
    assert r["restored"] is True and r["summary"] == f"{out}/summary.md"
    rows = r["rows"]
    # the same Tune experiment went on: the trials known before the kill kept their ids
    assert before and before <= {row["trial"] for row in rows}
    assert sorted(row["lo"] for row in rows) == [-1.0, 0.5]
    # every trial's newest checkpoint by its last report, which ASHA judged (none for a trial
    # stopped inside its first epoch)
    for row in rows:
        assert row["status"] in ("done", "stopped")
        if row["epochs_run"] == 0:
            assert row["checkpoint"] is None and row["eval"] == {}
            continue
        assert row["checkpoint"].endswith(f"epoch-{row['epochs_run']:05d}")
        # one evaluation of every trial's checkpoint, in one table
        assert 0.0 <= row["eval"]["kNN top-1"] <= 1.0
        assert row["test_top1"] == row["eval"]["kNN top-1"]
    assert len(found("pairs-*")) == 2
    m = read_manifest(out)
    assert m["restored"] is True and m["stages"]["bootstrap"] == 0.0  # reused after the kill
    assert found("summary.md") and found("acc_vs_k.png") and found("tune/sweep-*/*/events.out.*")
    assert _free_cpus(2.0) == 2.0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["space.method=[simclr,mocov9]"], "mocov9"),
        (["space.backbone=[test_resnet,no_such_net]"], "no_such_net"),
        (["space.lo=[0.5,0.99995]"], "0.99995 exceeds"),
        (["space.method=[simclr,byol]", "space.temperature=[0.1]"], "temperature"),
        (["grace_period=5"], "grace_period"),
        (["protocols=[knn,astrology]"], "astrology"),
        (["pretrain.monitor_split=test"], "select trials on the test split"),
        (["space.method=[simclr,byol]", "pairs_mode=cancel"], "byol"),
    ],
)
@pytest.mark.usefixtures("ray_cluster")
def test_a_bad_search_space_fails_before_any_trial(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(SeppError, match=message):
        run_sweep(load(SweepConfig, None, _overrides(out, *extra)))
    assert not out.exists()  # nothing ingested, mined or trained


def test_the_ranking_reads_the_selection_metric_never_test() -> None:
    def row(name: str, val: float | None, test: float) -> dict[str, Any]:
        return {"trial": name, "selection": val, "test_top1": test}

    rows = [row("a", 0.6, 0.9), row("b", 0.8, 0.1), row("c", None, 1.0), row("d", 0.7, 0.5)]
    assert [r["trial"] for r in ranked(rows, "max")] == ["b", "d", "a", "c"]
    assert [r["trial"] for r in ranked(rows, "min")] == ["a", "d", "b", "c"]


def test_a_knn_metric_needs_a_labeled_val_split() -> None:
    c = load(SweepConfig, None, ["out=x"])
    splits = {"train": {"labeled": 90}, "test": {"labeled": 30}}
    with pytest.raises(SeppError, match="'val' splits.*val_fraction"):
        _check_monitor(c, {"splits": splits})
    with pytest.raises(SeppError, match="'val' splits"):
        _check_monitor(c, {"splits": {**splits, "val": {"labeled": 0}}})
    _check_monitor(c, {"splits": {**splits, "val": {"labeled": 5}}})


def test_the_monitor_asha_reads_queries_val_images_never_test(
    tiny: tuple[Path, dict[str, Any]],
) -> None:
    import ray

    from sepp_ray.data.dataset import ImageDataset
    from sepp_ray.train.driver import PretrainConfig, _monitor

    ds = ImageDataset.open(glob.glob(str(tiny[0] / "data-*"))[0])  # the sweep's own data
    ids = {
        split: set(ds.read_table(["id"], split=split)["id"].to_pylist())
        for split in ("train", "val", "test")
    }
    assert all(ids.values())
    cfg = PretrainConfig(dataset=ds.uri, out="x", knn_max_train=50, knn_max_test=1000)
    sets = _monitor(ds, cfg, 16)
    assert sets is not None and sets["split"] == "val"
    query = {int(i) for b in ray.get(sets["query"]) for i in b["id"]}
    bank = {int(i) for b in ray.get(sets["train"]) for i in b["id"]}
    assert query == ids["val"]  # every val image, and nothing else: no test id
    assert bank <= ids["train"] and not (query | bank) & ids["test"]
