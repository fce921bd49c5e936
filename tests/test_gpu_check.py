"""The prepared GPU check in its tiny mode: the command a GPU session runs first
(`make gpu-check OUT=dir`) works end to end on CPU, every part, before any GPU minute is spent.
Slow: `make test-slow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check.feed import Setting, defaults, grid, verdict
from benchmarks.gpu_check.parts import PARTS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_mode(tmp_path: Path, ray_cluster: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_cluster}
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--mode", "tiny",
         "--budget", "1500"],
        capture_output=True, text=True, timeout=1800, env=env, cwd=REPO,
    )  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "tiny" and list(report["parts"]) == [*PARTS, "ratios"]
    # gpu_tests only collects on CPU; every other part must run and give figures
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("log_tail"), r.stdout[-2000:])
        assert part["figures"], name
    figures = {f["name"]: f for p in report["parts"].values() for f in p["figures"]}
    assert figures["host syncs per step (SyncCounter)"]["value"] == 0
    assert figures["graph breaks in the loss module forward"]["value"] == 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") >= len(figures) and "host syncs per step" in table
    assert "target 0: met" in r.stdout
    # feed: the tiny grid (2 x 2, pageable only without CUDA), each setting measured
    feed = report["parts"]["feed"]["figures"]
    rates = {f["name"]: f["value"] for f in feed if f["name"].endswith(": batches/s")}
    waits = [f["value"] for f in feed if f["name"].endswith(": waited")]
    assert len(rates) == len(waits) == 4 and all(v > 0 for v in rates.values()), feed
    assert all(0 <= w < 1 for w in waits), waits
    assert f"feed {defaults(False).label()}: batches/s" in rates
    best = figures["feed best setting"]["value"]
    assert rates[f"feed {best}: batches/s"] == max(rates.values())
    share = figures[f"feed defaults ({defaults(False).label()}) / best"]
    assert 0 < share["value"] <= 1 and share["ok"] == (share["value"] >= 0.95)
    assert "feed best setting" in table and (tmp_path / "feed.md").exists()


def test_feed_grid_holds_the_defaults_and_pins_only_on_cuda() -> None:
    full, tiny = grid(False, True), grid(True, False)
    assert len(full) == 18 and defaults(True) in full and Setting(16, 4, False) in full
    assert len(tiny) == 4 and defaults(False) in tiny and not any(s.pinned for s in tiny)
    assert defaults(True).pinned and not defaults(False).pinned


def test_feed_verdict_names_the_best_setting_and_the_defaults_share() -> None:
    rows = [
        {"read_ahead": 8, "prefetch_batches": 2, "pinned": False, "batches_per_s": 90.0},
        {"read_ahead": 16, "prefetch_batches": 4, "pinned": False, "batches_per_s": 100.0},
    ]
    v = verdict(rows, Setting(8, 2, False))
    assert v["best"] == "read_ahead 16, prefetch 4, pageable" and v["ratio"] == 0.9
    assert not v["ok"]
    assert verdict(rows[:1] + [{**rows[1], "batches_per_s": 94.0}], Setting(8, 2, False))["ok"]


def test_gpu_check_refuses_an_unknown_part(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--parts", "nope"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 2 and "unknown part" in r.stderr and "syncs" in r.stderr
