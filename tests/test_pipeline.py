"""`sepp pipeline` end to end on synthetic data, and its reuse of complete stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from sepp_ray.config import load
from sepp_ray.errors import SeppError
from sepp_ray.pipeline import PipelineConfig, run_pipeline

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_small_pipeline_then_a_rerun_reuses_every_stage(
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
        "bootstrap_epochs=1",  # = pretrain.epochs
        "pretrain.backbone=test_resnet",
        "pretrain.epochs=1",
        "pretrain.batch_size=32",
        "pretrain.warmup_epochs=0",
        "pretrain.knn_k=20",
        "pretrain.cpus_per_worker=0.5",
        "pretrain.shuffle_buffer=0",
        "mining.lo=-1",
        "mining.hi=0.9999",
        "mining.k=20",
        "protocols=knn",
    ]
    cfg = load(PipelineConfig, None, overrides)
    first = run_pipeline(cfg)
    report = Path(first["report"]).read_text()
    assert "## Accuracy" in report and "pairs: 20 for 20 of 20 anchors" in report
    assert set(first["timings"]) == {"data", "bootstrap", "pairs", "baseline", "sepp", "eval"}
    assert (tmp_path / "work" / "report" / "pairs_grid.png").exists()
    # the bootstrap run is as long as the baseline and equal to it: trained once, reused
    assert "baseline" in first["reused"] and first["reused"] == ["baseline"]
    second = run_pipeline(load(PipelineConfig, None, overrides))
    assert sorted(second["reused"]) == sorted(first["timings"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("protocols=knn,lineer", "unknown protocol"),
        ("pairs_mode=doubled", "pairs.mode must be one of"),
        ("pretrain.method=simclr2", "simclr2"),
        ("mining.lo=1.5", "lo"),
    ],
)
def test_bad_settings_fail_before_any_stage_runs(
    tmp_path: Path, override: str, message: str
) -> None:
    cfg = load(PipelineConfig, None, ["source=synthetic", f"work={tmp_path / 'w'}", override])
    with pytest.raises(SeppError, match=message):
        run_pipeline(cfg)
    assert not (tmp_path / "w").exists()
