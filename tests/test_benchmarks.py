"""Every benchmark script still runs, on tiny inputs (its figures mean nothing here), so a session
that gets a GPU finds them working. Run as subprocesses, the way users run them; the Ray ones
join the session cluster. Slow: `make test-slow`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sepp_ray.data.ingest import ingest
from sepp_ray.data.sources import SourceOptions, open_source

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def _run(args: list[str], ray_address: str | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    r = subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir holding a tiny ingested dataset where the scripts look for CIFAR-10."""
    work = tmp_path_factory.mktemp("bench")
    opts = SourceOptions(n=128, size=16, chunk_size=64)
    ingest(open_source("synthetic", options=opts), str(work / "cifar10"))
    return work


def test_mining_benchmark() -> None:
    out = _run(["benchmarks.mining", "--n", "2000", "--dim", "32", "--backend", "numpy", "torch"])
    rows = [line for line in out.splitlines() if line.startswith("|") and "| 2000 |" in line]
    assert {"numpy", "torch"} <= {r.split("|")[1].strip() for r in rows}, out


def test_eval_benchmark() -> None:
    out = _run(["benchmarks.eval", "--n", "2000", "--m", "400", "--dim", "16", "--epochs", "2"])
    assert "| cpu (" in out, out


def test_augment_benchmark() -> None:
    out = _run(
        ["benchmarks.augment", "--sizes", "16", "--batch", "16", "--seconds", "0.2"]
        + ["--devices", "cpu"]
    )
    assert "simclr  16 px" in out and "views/s" in out, out


def test_ingest_benchmark(tmp_path: Path, ray_cluster: str) -> None:
    out = _run(
        ["benchmarks.ingest", "--data", str(CIFAR), "--workdir", str(tmp_path)]
        + ["--limit", "300", "--bare", "100"],
        ray_cluster,
    )
    assert "| 300 |" in out, out


def test_embed_benchmark(tiny: Path, ray_cluster: str) -> None:
    out = _run(
        ["benchmarks.embed", "--dataset", str(tiny / "cifar10"), "--cifar-stem"]
        + ["--size", "16", "--batch", "32"],
        ray_cluster,
    )
    assert "| bare forward loop |" in out and "| sepp embed (Ray Data" in out, out


def test_pretrain_benchmark(tiny: Path, ray_cluster: str) -> None:
    out = _run(
        ["benchmarks.pretrain", "--dataset", str(tiny / "cifar10"), "--backbone", "test_resnet"]
        + ["--cifar-stem", "--batch", "32", "--steps", "2", "--epochs", "2"]
        + ["--loader-workers", "0"],
        ray_cluster,
    )
    rows = ("bare step", "cpu torchvision aug DataLoader")
    rows += ("ray train (1 worker, resident)", "ray train (1 worker, stream)")
    for row in rows:
        assert f"| {row}" in out, out


def test_sampler_precision_benchmark(tiny: Path, ray_cluster: str) -> None:
    out = _run(
        ["benchmarks.sampler_precision", "--workdir", str(tiny), "--epochs", "1"]
        + ["--batch", "32", "--backbone", "test_resnet", "--k", "0.5"],
        ray_cluster,
    )
    assert "| lower threshold | pairs |" in out and "N=" in out, out


def test_remine_benchmark(tmp_path: Path, ray_cluster: str) -> None:
    out = _run(
        ["benchmarks.remine", "--data", str(CIFAR), "--workdir", str(tmp_path)]
        + ["--per-class", "12", "--test-per-class", "4", "--epochs", "2", "--batch", "32"]
        + ["--backbone", "test_resnet", "--lo", "-1", "--hi", "0.9999", "--m", "1"],
        ray_cluster,
    )
    assert "| round | encoder (epochs trained) | pairs |" in out and "| 2 | online (1) |" in out, (
        out
    )


def test_resident_benchmark() -> None:
    out = _run(
        ["benchmarks.resident", "--data", str(CIFAR), "--images", "1024", "--rounds", "1"]
        + ["--batch", "128"]
    )
    assert '"resident_per_s"' in out and '"stream_per_s"' in out, out


def test_ingest_compare_benchmark() -> None:
    out = _run(
        ["benchmarks.ingest_compare", "--data", str(CIFAR), "--images", "1280", "--ranks", "1"]
        + ["--rounds", "1", "--epochs", "1", "--batch", "128"]
    )
    assert out.strip(), out


def test_device_decode_benchmark() -> None:
    out = _run(["benchmarks.device_decode", "--images", "16", "--batch", "8", "--rounds", "1"])
    assert "|" in out, out
