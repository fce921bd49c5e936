"""One sweep trial: a Tune Trainable that launches a Ray Train pretraining run.

Why a class and not a function trainable with Tune's ``TuneReportCallback``: when ASHA stops a
trial, Tune ends the trial's actor, and a Ray Train run killed that way leaves its placement
group reserved until the sweep's driver exits (Ray Train relies on the State API to clean up,
which a cluster without a dashboard lacks), so stopped trials would starve the next ones of
CPUs or GPUs. Here the trial's ``cleanup`` aborts the run through its controller, which frees
the workers and their placement group, and a run past its last epoch is left to finish and
write its manifest. Each epoch's metrics reach Tune through ``_Forward``: a Ray Train callback
in the run's controller that puts them on a queue the trial's ``step`` reads. Each result
carries ``step``, the optimizer steps done, ASHA's clock (``space.trial_plan``).
"""

from __future__ import annotations

import math
import threading
from typing import Any

from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Empty, Queue

from sepp_ray.tune.space import TrialContext, trial_out, trial_plan, trial_pretrain


class _Forward(UserCallback):
    """Runs in the Train controller: rank 0's metrics of each report go to the trial, with
    the controller's handle, so the trial can abort the run."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        import ray

        # blocks while the previous result waits: training runs at most an epoch ahead of Tune
        self.queue.put(("result", dict(metrics[0]), ray.get_runtime_context().current_actor))


class SweepTrial(tune.Trainable):
    """Tune's view of one pretraining run: one ``step`` per epoch."""

    def setup(self, config: dict[str, Any], ctx: TrialContext) -> None:  # type: ignore[override]
        self.cfg = trial_pretrain(ctx, dict(config))
        self.out = trial_out(ctx, self.cfg)
        self.plan = trial_plan(ctx, self.cfg)
        self.metric: str = ctx.metric
        self.last: dict[str, Any] = {self.metric: math.nan}
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.controller: Any = None
        self.last_epoch = 0
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self) -> None:
        from dataclasses import replace

        from sepp_ray.flow.stages import complete
        from sepp_ray.train.driver import pretrain

        try:
            done = complete(self.out)
            if done is None:
                pretrain(replace(self.cfg, out=self.out), callbacks=[_Forward(self.queue)])
            else:  # finished by an earlier sweep: replay its curve so the scheduler sees it
                for h in done["history"]:
                    self.queue.put(("result", h, None))
            self.queue.put(("done", None, None))
        except BaseException as e:  # noqa: BLE001 - handed to Tune, which records the trial's error
            self.queue.put(("error", e, None))

    def step(self) -> dict[str, Any]:
        kind, value, controller = self.queue.get()
        if kind == "error":
            raise value
        if kind == "done":  # a run that reported nothing more: end the trial
            return {**self.last, "done": True}
        self.controller = controller or self.controller
        self.last_epoch = int(value.get("epoch", self.last_epoch))
        step = min(self.last_epoch * self.plan["steps_per_epoch"], self.plan["total_steps"])
        # Tune wants the metric in every result: epochs without a kNN monitor carry the last
        self.last = {
            **value,
            self.metric: value.get(self.metric, self.last[self.metric]),
            "step": step,
        }
        return {**self.last, "done": self.last_epoch >= self.plan["epochs"]}

    def cleanup(self) -> None:
        """Past the last epoch the run only writes its manifest: wait for it. Stopped earlier
        (by ASHA): abort the run so its workers and placement group are freed at once."""
        import ray

        if not self.thread.is_alive():
            return
        if self.last_epoch >= self.plan["epochs"]:
            while self.thread.is_alive():  # drain what a run longer than planned still reports
                try:
                    self.queue.get(timeout=1)
                except Empty:
                    pass
            return
        if self.controller is not None:
            aborted = self.controller.abort.remote()  # queued before the controller resumes
            try:
                while True:  # unblock a controller waiting to hand over a result
                    self.queue.get_nowait()
            except Empty:
                pass
            try:
                ray.get(aborted)
            except ray.exceptions.RayActorError:
                pass  # abort ends the controller's process: the expected outcome
        self.thread.join(timeout=30)
