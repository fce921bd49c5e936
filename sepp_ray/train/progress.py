"""A progress bar on the driver for a run whose epochs happen on Ray Train workers.

Rank 0 writes ``progress.json`` (epoch, epochs, a few metrics) into the run's output after every
epoch, and what the run does between epochs (a re-mining round) when that starts; the driver
polls it from a daemon thread while ``trainer.fit()`` blocks the main thread. Going through
storage keeps it working when the driver and the workers share nothing but the output URI (a
`ray job submit` driver on the head, workers on GPU nodes).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from tqdm import tqdm

from sepp_ray.console import console
from sepp_ray.storage import Location

PROGRESS = "progress.json"


def write_progress(out_uri: str, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
    shown = {k: round(float(v), 4) for k, v in metrics.items() if k in SHOWN}
    body = {"epoch": epoch, "epochs": epochs, **shown}
    Location(out_uri).write_bytes(PROGRESS, json.dumps(body).encode())


SHOWN = ("loss", "pairs_per_s", "knn_top1", "lr")


def write_stage(out_uri: str, stage: str) -> None:
    """Say what the run does between epochs (e.g. "re-mining round 2"): the bar shows it until
    the next epoch's progress replaces it."""
    loc = Location(out_uri)
    try:
        body = json.loads(loc.read_bytes(PROGRESS))
    except (FileNotFoundError, ValueError, OSError):
        body = {"epoch": 0}
    loc.write_bytes(PROGRESS, json.dumps({**body, "stage": stage}).encode())


class ProgressBar:
    """``with ProgressBar(out, epochs, start):`` shows epochs done while the body runs."""

    def __init__(self, out_uri: str, epochs: int, start: int, every_s: float = 2.0) -> None:
        self.loc, self.every_s = Location(out_uri), every_s
        # The console, not stderr: a quiet process sends stderr to its Ray log file. Position 0:
        # Ray Data's bars in this process would push ours down a line each; a log (`ray job
        # logs`, CI) gets an update at most every 30 s rather than a stream of them.
        out = console()
        self.bar = tqdm(
            total=epochs,
            initial=start,
            desc="pretrain",
            unit="epoch",
            file=out,
            ascii=True,
            position=0,
            mininterval=0.1 if out.isatty() else 30.0,
        )
        self.desc = "pretrain"
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ProgressBar:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(timeout=10)
        self._update()
        self.bar.close()

    def _poll(self) -> None:
        while not self.done.wait(self.every_s):
            self._update()

    def _update(self) -> None:
        try:
            body = json.loads(self.loc.read_bytes(PROGRESS))
        except (FileNotFoundError, ValueError, OSError):
            return  # not written yet, or caught mid-write: the next poll sees it
        stage = body.get("stage")
        desc = f"pretrain ({stage})" if stage else "pretrain"
        if desc != self.desc:
            self.desc = desc
            self.bar.set_description(desc, refresh=False)
        if body["epoch"] > self.bar.n:  # redrawn on news only, as often as mininterval allows
            self.bar.set_postfix({k: body[k] for k in SHOWN if k in body}, refresh=False)
            self.bar.update(body["epoch"] - self.bar.n)
