"""One sweep trial: a Tune Trainable that launches a Ray Train pretraining run.

Why a class and not a function trainable with Tune's ``TuneReportCallback``: when ASHA stops a
trial, Tune ends the trial's actor, and a Ray Train run killed that way can leave its placement
group reserved until the sweep's driver exits (ray#54305), starving the next trials of CPUs or
GPUs. Ray 2.60 frees it through a detached ``PlacementGroupCleaner`` that polls the State API,
which works only where that API answers. Re-tested on Ray 2.60.0 (a function trainable running
a 1-worker TorchTrainer, stopped by Tune after 3 reports; the worker's 1-CPU group watched for
60 s after the stop): with the dashboard up and its address known, the group was removed within
2 s; with no dashboard (a plain ``pip install ray``), and on a host running several Ray clusters
(the State API then refuses to pick one), it stayed reserved for the whole 60 s. So the
workaround stays: the trial's ``cleanup`` ends a stopped run through public API only, which
frees its workers and placement group wherever it runs, and a run past its last step is left
to finish and write its manifest. Each report's metrics reach Tune through ``_Forward``: a Ray
Train callback in the run's controller that hands them to the trial's ``step`` and waits for
Tune's verdict; told to stop, it raises `RunStopped`, which Ray Train treats as a failed run
and shuts down (workers and placement group released), with no retry. A trial's run
reports every plain-run epoch of optimizer steps and at its end (``report_every_steps``), and
each result carries ``step``, the optimizer steps done, ASHA's clock: trials whose epochs differ
in length (K and the thresholds change the pair items) are judged at the same steps. Each
checkpoint the run reports reaches Tune too: the result after it asks Tune to save the trial,
and Tune's checkpoint of the trial names the run's (``run_checkpoint.json``), so Tune lists a
trial's checkpoints and ranks them by the sweep's metric without a copy of the weights.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from ray import tune
from ray.train import UserCallback
from ray.util.queue import Empty, Queue

from sepp_ray.train.ray_checkpoints import CHECKPOINT_ONLY, uri_of
from sepp_ray.tune.space import TrialContext, trial_out, trial_plan, trial_pretrain

# Tune's result key by which a class trainable asks for a checkpoint (``tune.result``)
SHOULD_CHECKPOINT = "should_checkpoint"
POINTER = "run_checkpoint.json"


class RunStopped(Exception):
    """Raised in the Train controller to end a run that Tune stopped (ASHA)."""


class _Forward(UserCallback):
    """Runs in the Train controller: rank 0's metrics of each report go to the trial, and the
    run waits for the trial's answer (go on, or stop) before its next epoch. A report's
    checkpoint goes to the trial first; a report that only carries a checkpoint (saved between
    the run's fixed-step reports) is no result and waits for no answer."""

    def __init__(self, queue: Queue, control: Queue, out: str) -> None:
        self.queue = queue
        self.control = control
        self.out = out

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        if checkpoint is not None:
            self.queue.put(("checkpoint", uri_of(self.out, checkpoint), False))
        if metrics[0].get(CHECKPOINT_ONLY):
            return
        self.queue.put(("result", dict(metrics[0]), True))
        # a pause of one Tune round trip per report: a stopped trial's run ends at once, not
        # an epoch later with its workers still reserved
        if self.control.get() == "stop":
            raise RunStopped("the sweep's scheduler stopped this trial")


class SweepTrial(tune.Trainable):
    """Tune's view of one pretraining run: one ``step`` per report of the run."""

    def setup(self, config: dict[str, Any], ctx: TrialContext) -> None:  # type: ignore[override]
        self.cfg = trial_pretrain(ctx, dict(config))
        self.out = trial_out(ctx, self.cfg)
        self.plan = trial_plan(ctx, self.cfg)
        self.metric: str = ctx.metric
        self.last: dict[str, Any] = {self.metric: math.nan}
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.control = Queue(actor_options={"num_cpus": 0})
        self.held = False  # a live run waits for our answer to its last report
        self.last_step = 0
        self.run_checkpoint: str | None = None  # the run's newest reported checkpoint
        self.unsaved = False  # reported since Tune last saved this trial
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self) -> None:
        from dataclasses import replace

        from sepp_ray.flow.stages import complete
        from sepp_ray.train.driver import pretrain

        try:
            done = complete(self.out)
            if done is None:
                forward = _Forward(self.queue, self.control, self.out)
                pretrain(replace(self.cfg, out=self.out), callbacks=[forward])
            else:  # finished by an earlier sweep: replay its curve so the scheduler sees it
                for h in done["history"]:
                    self.queue.put(("result", h, False))
            self.queue.put(("done", None, False))
        except BaseException as e:  # noqa: BLE001 - handed to Tune, which records the trial's error
            self.queue.put(("error", e, False))

    def _answer(self, word: str) -> None:
        if self.held:
            self.control.put(word)
            self.held = False

    def step(self) -> dict[str, Any]:
        self._answer("go")  # Tune wants the next result: the run goes on
        kind, value, live = self.queue.get()
        while kind == "checkpoint":  # Tune saves the trial with the result that follows
            self.run_checkpoint, self.unsaved = value, True
            kind, value, live = self.queue.get()
        if kind == "error":
            raise value
        if kind == "done":  # a run that reported nothing more: end the trial
            return {**self.last, "done": True, **self._save_request()}
        self.held = bool(live)
        self.last_step = min(int(value["step"]), self.plan["total_steps"])
        # Tune wants the metric in every result: reports without a kNN monitor carry the last
        self.last = {
            **value,
            self.metric: value.get(self.metric, self.last[self.metric]),
            "step": self.last_step,
        }
        return {**self.last, "done": self.finished, **self._save_request()}

    def _save_request(self) -> dict[str, bool]:
        """Ask Tune to save the trial when the run reported a checkpoint since the last save."""
        return {SHOULD_CHECKPOINT: True} if self.unsaved else {}

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """Tune's checkpoint of the trial names the run's newest checkpoint (`POINTER`), which
        stays where the run wrote it: nothing is copied."""
        import json
        import os

        with open(os.path.join(checkpoint_dir, POINTER), "w") as f:
            json.dump({"uri": self.run_checkpoint}, f)
        self.unsaved = False

    def load_checkpoint(self, checkpoint: Any) -> None:
        """Nothing to load: a restored trial's run resumes from its own checkpoints, restored
        by Ray Train from the run's folder."""

    @property
    def finished(self) -> bool:
        """Whether the run reported its last optimizer step."""
        return self.last_step >= self.plan["total_steps"]

    def cleanup(self) -> None:
        """Past the last step the run only writes its manifest: let it. Stopped earlier (by
        ASHA): tell the run to stop, which ends it and frees its workers and placement group;
        then wait for it (a run not yet at a report is waited for 30 s at most)."""
        if not self.thread.is_alive():
            return
        word = "go" if self.finished else "stop"
        self._answer(word)
        deadline = None if self.finished else 30.0
        waited = 0.0
        while self.thread.is_alive() and (deadline is None or waited < deadline):
            try:  # drain what the run still reports, each answered the same way
                _, _, live = self.queue.get(timeout=1)
                self.held = bool(live)
                self._answer(word)
            except Empty:
                waited += 1.0
        self.thread.join(timeout=1)
