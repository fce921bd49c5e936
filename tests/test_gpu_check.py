"""The prepared GPU check: its tiny mode (the command a GPU session runs first, `make gpu-check
OUT=dir`) works end to end on CPU, every part, before any GPU minute is spent (slow:
`make test-slow`); its parts fit the GPU machine's budget, most important first; a part cut by
its limit keeps what it measured; its baselines time what they name; Ray's dashboard is asked
for only where its packages are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check.__main__ import run_all
from benchmarks.gpu_check.common import PartContext
from benchmarks.gpu_check.loader import MIN_TIMED, LoaderPlan, steady_rate
from benchmarks.gpu_check.parts import BUDGET_S, PARTS, Part

REPO = Path(__file__).resolve().parents[1]


def _figures(report: dict) -> dict[str, dict]:
    return {f["name"]: f for p in report["parts"].values() for f in p["figures"]}


@pytest.mark.slow
def test_gpu_check_tiny_mode(tmp_path: Path, ray_cluster: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_cluster}
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--mode", "tiny"],
        capture_output=True, text=True, timeout=1800, env=env, cwd=REPO,
    )  # fmt: skip
    check_tiny_report(tmp_path, r.stdout)


def check_tiny_report(out: Path, stdout: str) -> None:
    """What a tiny run must show (also read against a rehearsal's output folder)."""
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "tiny" and list(report["parts"]) == [*PARTS, "ratios"]
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("log_tail"), stdout[-2000:])
        assert part["figures"], name
    figures = _figures(report)
    assert figures["host syncs per step (SyncCounter)"]["value"] == 0
    assert figures["graph breaks in the loss module forward"]["value"] == 0
    # every test module imports (the GPU image lacks the curation server's and lightly's deps)
    assert figures["gpu tests"]["ok"], figures["gpu tests"]
    # two gloo ranks ran sepp's DDP step and stayed equal
    spread = figures["two ranks (gloo, cpu): parameter spread across ranks"]
    assert spread["value"] == 0 and spread["ok"]
    assert figures["two ranks (gloo, cpu): sepp step"]["value"] > 0
    # the loader baseline timed steady batches, the embedding warm work, scaled down and saying so
    loader = next(n for n in figures if n.startswith("cpu torchvision aug DataLoader alone"))
    assert f"{MIN_TIMED} steady batches after 4 drained" in loader
    work = next(f for n, f in figures.items() if n.startswith("embedding: timed work"))
    assert "tiny" in work["name"] and "scaled down from 30" in work["name"] and work["ok"]
    assert figures["embedding through Ray Data"]["value"] > 0
    assert figures["sepp through Ray Train, test_resnet 16 px, decode_on=gpu"]["value"] > 0
    table = (out / "gpu_check.md").read_text()
    assert table.count("\n| ") >= len(figures) and "host syncs per step" in table
    assert "target 0: met" in stdout
    # feed: the tiny grid (pageable only without CUDA), each setting measured
    from benchmarks.gpu_check.feed import defaults, grid

    feed = report["parts"]["feed"]["figures"]
    rates = {f["name"]: f["value"] for f in feed if f["name"].endswith(": batches/s")}
    waits = [f["value"] for f in feed if f["name"].endswith(": waited")]
    assert len(rates) == len(waits) == len(grid(True, False)), feed
    assert all(v > 0 for v in rates.values()), feed
    assert all(0 <= w < 1 for w in waits), waits
    assert f"feed {defaults(False).label()}: batches/s" in rates
    best = figures["feed best setting"]["value"]
    assert rates[f"feed {best}: batches/s"] == max(rates.values())
    share = figures[f"feed defaults ({defaults(False).label()}) / best"]
    assert 0 < share["value"] <= 1 and share["ok"] == (share["value"] >= 0.95)
    assert "feed best setting" in table and (out / "feed.md").exists()


def test_parts_fit_the_budget_most_important_first() -> None:
    assert sum(p.limit_s for p in PARTS.values()) <= BUDGET_S == 420
    assert list(PARTS)[:2] == ["ray_train", "train224"]
    for p in PARTS.values():  # every registration names a function that exists
        assert callable(p.fn()), p.target


# parts of a made-up check, run through the real runner: one quick, one cut by its limit
def quick_part(ctx: PartContext) -> None:
    ctx.add("quick figure", 1.5, "s")


def cut_part(ctx: PartContext) -> None:
    ctx.add("measured before the cut", 7, "items/s")
    time.sleep(120)
    ctx.add("never measured", 0)


def test_a_cut_part_keeps_its_figures_and_the_report_is_written(tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    mod = "tests.test_gpu_check"
    chosen = [Part("quick", f"{mod}:quick_part", 60, 60), Part("cut", f"{mod}:cut_part", 12, 12)]
    report = run_all(chosen, tiny=True, out=tmp_path, budget=120)
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["parts"] == report["parts"] and list(report["parts"]) == ["quick", "cut"]
    assert report["parts"]["quick"]["status"] == "ok"
    assert [f["value"] for f in report["parts"]["quick"]["figures"]] == [1.5]
    cut = report["parts"]["cut"]
    assert cut["status"] == "timed out after 12 s"
    assert [f["name"] for f in cut["figures"]] == ["measured before the cut"]
    assert "| cut | - | timed out after 12 s |" in (tmp_path / "gpu_check.md").read_text()


def test_make_passes_the_parts_on() -> None:
    r = subprocess.run(
        ["make", "-n", "gpu-check", "OUT=/tmp/x", "PARTS=ray_train,step"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert "--parts ray_train,step" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(["make", "-n", "gpu-check", "OUT=/tmp/x"], capture_output=True, text=True,
                       cwd=REPO, timeout=60)  # fmt: skip
    assert "--out /tmp/x" in r.stdout and "--parts" not in r.stdout


def test_loader_baseline_times_steady_batches_after_the_prefetch() -> None:
    plan = LoaderPlan(workers=16)
    assert plan.drain == 16 * 2 + 2 and plan.total == plan.drain + MIN_TIMED
    served: list[int] = []
    items_s, timed = steady_rate(
        iter(range(plan.total)), plan, 8, served.append, torch.device("cpu")
    )
    assert timed == MIN_TIMED and served == list(range(plan.total)) and items_s > 0
    with pytest.raises(RuntimeError, match="fewer than 20"):
        steady_rate(iter(range(plan.total - 1)), plan, 8, served.append, torch.device("cpu"))


def test_init_ray_asks_for_the_dashboard_only_with_its_packages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sepp_ray.ray_utils import dashboard_missing, init_kwargs

    assert dashboard_missing() is None  # ray[default] is in the dev environment
    kw = init_kwargs(None, num_cpus=2)
    assert kw["include_dashboard"] is True and kw["dashboard_host"] == "127.0.0.1"
    assert kw["num_cpus"] == 2
    monkeypatch.setitem(sys.modules, "ray.dashboard.optional_deps", None)  # as if not installed
    assert "optional_deps" in (dashboard_missing() or "")
    kw = init_kwargs(None)
    assert kw["include_dashboard"] is False and "dashboard_host" not in kw
    assert "include_dashboard" not in init_kwargs("ray://head:10001")  # the cluster decides


def test_feed_grid_holds_the_defaults_and_pins_only_on_cuda() -> None:
    from benchmarks.gpu_check.feed import Setting, defaults, grid

    full, tiny = grid(False, True), grid(True, False)
    assert defaults(True) in full and Setting(16, 4, False) in full and Setting(2, 1, True) in full
    assert defaults(False) in tiny and not any(s.pinned for s in tiny)
    assert defaults(True).pinned and not defaults(False).pinned
    for g, pins in ((full, 2), (tiny, 1)):  # a whole product, each setting once
        aheads, fetches = {s.read_ahead for s in g}, {s.prefetch_batches for s in g}
        assert len(g) == len(set(g)) == len(aheads) * len(fetches) * pins


def test_feed_verdict_names_the_best_setting_and_the_defaults_share() -> None:
    from benchmarks.gpu_check.feed import Setting, verdict

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
