"""A pairs mode the method cannot honour fails at the command line, before any data or Ray."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from sepp_ray.errors import SeppError
from sepp_ray.train.driver import PretrainConfig
from sepp_ray.train.items import PairsConfig
from sepp_ray.train.step import pair_use_of_mode

REPO = Path(__file__).resolve().parents[1]


def test_pretrain_refuses_a_mode_the_method_cannot_honour(tmp_path: Path) -> None:
    method, mode, out = "byol", "multi_positive", tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sepp_ray.cli",
            "pretrain",
            str(tmp_path / "no-dataset"),  # never opened: the check comes first
            str(out),
            f"method={method}",
            f"pairs.mode={mode}",
            f"pairs.pairs={tmp_path / 'no-pairs'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2, r.stderr
    assert f"method '{method}' cannot use mined positives as extra positives" in r.stderr
    assert "['mocov2', 'nnclr', 'simclr', 'supcon']" in r.stderr
    assert "Traceback" not in r.stderr and "Ray" not in r.stderr
    assert not out.exists()


def test_pair_use_of_mode() -> None:
    assert pair_use_of_mode("multi_positive") == pair_use_of_mode("both") == "attract"
    assert pair_use_of_mode("cancel") == "cancel"
    assert pair_use_of_mode("dataset") == pair_use_of_mode("none") == "none"


@pytest.mark.parametrize(
    "method,mode,ok",
    [
        ("vicreg", "both", False),
        ("dino", "multi_positive", False),
        ("simsiam", "dataset", True),  # pair items: every method takes them
        ("simclr", "multi_positive", True),
        ("supcon", "both", True),
    ],
)
def test_validate_checks_the_pair_use(method: str, mode: str, ok: bool) -> None:
    cfg = PretrainConfig(
        dataset="d", out="o", method=method, pairs=PairsConfig(pairs="p", mode=mode)
    )
    if ok:
        cfg.validate()
    else:
        with pytest.raises(SeppError, match=f"'{method}' cannot use"):
            cfg.validate()
    replace(cfg, pairs=PairsConfig(pairs=None, mode=mode)).validate()  # no pairs: no check
