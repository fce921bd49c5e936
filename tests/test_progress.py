"""The driver's pretraining progress bar follows what rank 0 writes to the run's output."""

from __future__ import annotations

import time
from pathlib import Path

from sepp_ray.train.progress import ProgressBar, write_progress, write_stage


def test_the_bar_follows_the_epochs_written(tmp_path: Path) -> None:
    out = str(tmp_path)
    with ProgressBar(out, epochs=5, start=1, every_s=0.05) as p:
        assert p.bar.n == 1
        write_progress(out, 3, 5, {"loss": 2.5, "pairs_per_s": 100.0, "epoch": 3})
        deadline = time.monotonic() + 5
        while p.bar.n != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.bar.n == 3
        assert p.bar.postfix is not None and "loss=2.5" in p.bar.postfix
    write_progress(out, 5, 5, {"loss": 1.0})
    assert p.bar.n == 3  # closed: no updates after the run


def test_no_progress_file_yet_is_not_an_error(tmp_path: Path) -> None:
    with ProgressBar(str(tmp_path / "nothing"), epochs=2, start=0, every_s=0.05) as p:
        time.sleep(0.2)
    assert p.bar.n == 0


def test_the_bar_says_what_the_run_does_between_epochs(tmp_path: Path) -> None:
    out = str(tmp_path)
    with ProgressBar(out, epochs=4, start=0, every_s=0.05) as p:
        write_progress(out, 2, 4, {"loss": 2.0})
        write_stage(out, "re-mining round 2")
        deadline = time.monotonic() + 5
        while "re-mining" not in p.desc and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.bar.desc.startswith("pretrain (re-mining round 2)") and p.bar.n == 2
        write_progress(out, 3, 4, {"loss": 1.5})  # the next epoch: the stage is over
        while p.bar.n != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.desc == "pretrain" and "re-mining" not in p.bar.desc
