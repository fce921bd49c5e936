"""A quiet console: our lines on the terminal, Ray's output in the run's log file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sepp_ray.console import headline, log_path_for

REPO = Path(__file__).resolve().parents[1]
# what Ray prints on a healthy run and a user must not have to read
RAY_NOISE = re.compile(
    r"core_worker\.cc|gcs_actor_scheduler|raylet|\(pid=|\(RayTrainWorker|SplitCoordinator|"
    r"split\(1, equal=True\)|Reporting training result|TrainingReport|logging_progress|"
    r"Running Dataset|Dataset job will hang|Execution plan|^INFO |^WARNING |^\d{4}-\d\d-\d\d "
)
QUIET_SCRIPT = """
import logging, os, sys
from sepp_ray.console import console, quiet, say
logging.basicConfig(level=logging.INFO)
with quiet(sys.argv[1]) as path:
    say("stage: start")
    print("ray says a lot")
    os.write(2, b"core_worker.cc:2465: Actor with class name: 'PreemptionWatcher'\\n")
    os.write(1, b"(pid=123) worker output\\n")
    logging.getLogger("sepp_ray.x").warning("disk almost full")
    logging.getLogger("sepp_ray.x").warning("disk almost full")
    logging.getLogger("ray.data").info("logging_progress table")
    print("bar", file=console(), end="\\n")
say("after")
"""


def _quiet_run(tmp_path: Path, *env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    log = tmp_path / "logs" / "run.log"
    run_env = {**os.environ, "PYTHONPATH": str(REPO)}
    run_env.pop("SEPP_VERBOSE", None)
    run_env.update(e.split("=", 1) for e in env)
    script = QUIET_SCRIPT.replace(
        "quiet(sys.argv[1])", "quiet(sys.argv[1], bool(os.environ.get('V')))"
    )
    p = subprocess.run(
        [sys.executable, "-c", script, str(log)],
        capture_output=True,
        text=True,
        env=run_env,
        check=True,
        timeout=60,
    )
    return p, log


def test_quiet_sends_ray_output_to_the_log_and_ours_to_the_terminal(tmp_path: Path) -> None:
    p, log = _quiet_run(tmp_path)
    assert p.stdout == "stage: start\nbar\nafter\n"
    assert p.stderr == "warning: disk almost full\n"  # once, though logged twice
    text = log.read_text()
    for line in ("ray says a lot", "core_worker.cc:2465", "(pid=123) worker output"):
        assert line in text
    assert text.count("disk almost full") == 2 and "logging_progress table" in text


def test_verbose_shows_everything_and_writes_no_log(tmp_path: Path) -> None:
    p, log = _quiet_run(tmp_path, "V=1")
    assert "ray says a lot" in p.stdout and "core_worker.cc" in p.stderr
    assert not log.exists()


def test_log_path_for_commands() -> None:
    assert log_path_for("/w/run", "pipeline") == "/w/run/logs/pipeline.log"
    assert log_path_for("/w/data/ds", "ingest") == "/w/data/logs/ds.ingest.log"
    assert log_path_for("file:///w/ds/", "eval") == "/w/logs/ds.eval.log"
    assert (
        log_path_for("s3://b/ds/", "ingest") == f"{tempfile.gettempdir()}/sepp-logs/ds.ingest.log"
    )
    assert log_path_for("", "ingest") is None


def test_headlines() -> None:
    assert headline({"kind": "images", "num_images": 9, "skipped": {"count": 1}}) == (
        "9 images, 1 skipped"
    )
    assert headline({"kind": "pairs", "num_pairs": 20}) == "20 pairs"
    pre = {"kind": "pretrain", "epochs": 3, "final_checkpoint": "x", "final_metrics": {}}
    assert headline(pre) == "3 epochs"
    pre["final_metrics"] = {"loss": 1.23456, "knn_top1": 0.5}
    assert headline(pre) == "3 epochs, loss 1.235, kNN top-1 0.500"
    # under a step budget a run with pair items runs fewer epochs than configured: shown so
    pre.update(epochs_run=2, total_steps=30)
    assert headline(pre) == "2 epochs, 30 steps, loss 1.235, kNN top-1 0.500"
    pre["data_plane"] = {"mode": "resident", "reason": "fits", "decoded_bytes": 1}
    assert headline(pre) == "2 epochs, 30 steps, loss 1.235, kNN top-1 0.500, resident data"
    assert headline({"kind": "eval", "checkpoints": [1, 2]}) == "2 checkpoints evaluated"


def check_console(out: str, work: Path, stages: list[str], max_lines: int = 40) -> None:
    """What a pipeline shows: few lines, each stage's start and end, no Ray internals, the
    report; Ray's output is in the log file it names."""
    lines = [ln for ln in out.split("\n") if ln.strip()]
    assert len(lines) <= max_lines, out
    noisy = [ln for ln in lines if RAY_NOISE.search(ln)]
    assert not noisy, noisy
    for stage in stages:
        assert any(f"[pipeline] {stage}: running -> " in ln for ln in lines), (stage, out)
        assert any(
            re.search(rf"\[pipeline\] {stage}: (done in \d+ s|reusing) ", ln) for ln in lines
        ), (stage, out)
    assert lines[-1].startswith("[pipeline] report: ")
    log = work / "logs" / "pipeline.log"
    assert lines[0] == f"Ray logs: {log} (--verbose or SEPP_VERBOSE=1 shows them here)"
    assert log.stat().st_size > 0


TINY = [
    "source=synthetic",
    "source_options.n=60",
    "source_options.size=16",
    "arms=[plain]",
    "seeds=1",
    "pretrain.backbone=test_resnet",
    "pretrain.epochs=1",
    "pretrain.batch_size=16",
    "pretrain.warmup_epochs=0",
    "pretrain.knn_k=5",
    "pretrain.cpus_per_worker=0.5",
    "protocols=knn",
]


def _sepp(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", **env}
    env.pop("SEPP_VERBOSE", None)
    return subprocess.run(
        [sys.executable, "-m", "sepp_ray.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,  # make run under a loaded 2-core machine
    )


@pytest.mark.slow  # repeats a pipeline run; the quiet console is tested above in seconds
def test_tiny_pipeline_console_is_quiet(tmp_path: Path, ray_cluster: str) -> None:
    p = _sepp(["pipeline", *TINY, "work=work"], tmp_path, {"RAY_ADDRESS": ray_cluster})
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stderr == "", p.stderr
    check_console(p.stdout, tmp_path / "work", ["data", "plain-seed0", "eval"], max_lines=12)


@pytest.mark.slow
def test_make_run_console_is_quiet(tmp_path: Path) -> None:
    """`make run`'s command on its own local cluster, as a user runs it."""
    config = str(REPO / "jobs" / "pipeline-digits.yaml")
    p = _sepp(["pipeline", "--config", config, "work=runs/pipeline"], tmp_path, {})
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout + p.stderr
    stages = ["data", "bootstrap", "pairs", "plain-seed1", "ap-seed0", "sp-seed1", "eval"]
    check_console(out, tmp_path / "runs" / "pipeline", stages)
