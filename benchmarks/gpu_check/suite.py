"""The `gpu`-marked tests as a part of the GPU check (on a machine without CUDA they are only
collected: that every test module imports in the GPU image is itself worth knowing)."""

from __future__ import annotations

import subprocess
import sys

import torch

from benchmarks.gpu_check.common import REPO, PartContext


def gpu_tests(ctx: PartContext) -> None:
    """`pytest -m gpu` over the whole test folder; the last line of its summary is the figure."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    if not torch.cuda.is_available():
        cmd.append("--collect-only")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    (ctx.out / "gpu_tests.log").write_text(r.stdout + r.stderr)
    last = (r.stdout.strip().splitlines() or ["no output"])[-1]
    ctx.add("gpu tests", last, "", "all pass (collect only without CUDA)", r.returncode == 0)
