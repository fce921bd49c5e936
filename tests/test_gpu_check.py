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


def test_gpu_check_refuses_an_unknown_part(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--parts", "nope"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 2 and "unknown part" in r.stderr and "syncs" in r.stderr
