"""Equal in everything but the pairs: plain, augmentation-pair and semantic-pair runs on the
same data plan the same schedules step by step (learning rate, weight decay, EMA momentum,
DINO's teacher temperature and frozen last layer) and the same data-sized buffers; data-scale
recipes; the warning for runs crowded with pair items; reports at fixed steps."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from sepp_ray.methods import create_method, fit_hparams
from sepp_ray.methods.scale import DataScale
from sepp_ray.train.budget import pair_share_warning
from sepp_ray.train.items import PairsConfig, plan_items
from sepp_ray.train.milestones import combine, segment_ends, train_to_milestones
from sepp_ray.train.optim import set_wd, warmup_cosine
from sepp_ray.train.optim_defaults import resolve_optim
from sepp_ray.train.schedule import plan_schedule
from sepp_ray.train.step import train_epoch

# the demo's shape (`make run`): 1,359 train images, 680 mined pairs, batch 128
IMAGES, PAIRS, BATCH, EPOCHS = 1359, 680, 128, 3
ARMS = {
    "plain": PairsConfig(mode="none"),
    "ap": PairsConfig(pairs="mined", mode="dataset", augmentation_pairs=True),
    "sp": PairsConfig(pairs="mined", mode="dataset"),
}
DINO = {
    "out_dim": 64,
    "bottleneck_dim": 32,
    "warmup_teacher_temp": 0.04,
    "teacher_temp": 0.07,
    "warmup_teacher_temp_epochs": 2,
    "epochs": EPOCHS,
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def arm_items(arm: str) -> int:
    """The arm's training items as the driver counts them: originals plus its pair items."""
    rng = np.random.default_rng(0)
    anchors = rng.choice(IMAGES, size=PAIRS, replace=False)
    table = pa.table({"anchor_id": anchors, "positive_id": (anchors + 1) % IMAGES})
    plan = plan_items(table if arm != "plain" else None, None, ARMS[arm], seed=0)
    return IMAGES + plan.rows


def trajectory(method: str, arm: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every schedule of ``method`` in ``arm`` at each step, read from the objects training
    uses: the planned schedule, the recipe's optimiser and the method built from its fitted
    hyperparameters."""
    optim = resolve_optim(method, {"warmup_epochs": 1}, backbone="test_resnet")
    plain_budget = (IMAGES // BATCH) * EPOCHS  # every arm's optimizer steps (equal compute)
    s = plan_schedule(
        method,
        overrides,
        optim,
        images=IMAGES,
        items=arm_items(arm),
        batch_size=BATCH,
        epochs=EPOCHS,
        budget_steps=plain_budget,
        backbone="test_resnet",
    )
    torch.manual_seed(0)
    m = create_method(method, backbone="test_resnet", cifar_stem=True, **s.hparams)
    peak = optim.peak_lr(BATCH)
    opt = optim.build(m, peak)
    out: dict[str, Any] = {"spe": s.steps_per_epoch, "record": s.to_dict(), "steps": []}
    for step in range(s.total_steps):
        set_wd(opt, step, s.total_steps)
        row = {
            "lr": warmup_cosine(step, s.total_steps, s.warmup_steps, peak, optim.end_lr(peak)),
            "wd": [g["weight_decay"] for g in opt.param_groups],
        }
        epoch = s.epoch_at(step)
        if method == "dino":
            row["teacher_temp"] = m.criterion.teacher_temperature(epoch)  # type: ignore[operator]
            layer = m.head.last_layer  # type: ignore[union-attr]
            last = next(p for p in layer.parameters() if p.requires_grad)
            last.grad = torch.ones_like(last)
            m.on_before_optimizer_step(epoch)
            row["frozen"] = last.grad is None
        m.on_train_step_end(min(step / s.total_steps, 1.0))
        row["momentum"] = getattr(m, "current_momentum", None)
        out["steps"].append(row)
    return out


@pytest.mark.parametrize(
    ("method", "overrides"),
    [("simclr", {}), ("mocov2", {}), ("nnclr", {}), ("byol", {}), ("dino", DINO)],
)
def test_every_arm_follows_the_plain_runs_schedules_step_by_step(
    method: str, overrides: dict[str, Any]
) -> None:
    runs = {arm: trajectory(method, arm, overrides) for arm in ARMS}
    plain = runs["plain"]
    # the arms' data epochs differ (the pair items): what the schedules must not follow
    assert plain["spe"] == IMAGES // BATCH and runs["sp"]["spe"] == (IMAGES + PAIRS) // BATCH
    assert len(plain["steps"]) == (IMAGES // BATCH) * EPOCHS
    lrs = [r["lr"] for r in plain["steps"]]
    assert lrs[0] == 0.0 and lrs[IMAGES // BATCH] == pytest.approx(max(lrs))  # 1 plain epoch
    for arm in ("ap", "sp"):
        assert runs[arm]["steps"] == plain["steps"], arm
        assert runs[arm]["record"] == {**plain["record"], "steps_per_epoch": runs[arm]["spe"]}
    if method in ("mocov2", "nnclr"):  # sized from the split's images, never the arm's items
        assert {runs[a]["record"]["queue_size"] for a in ARMS} == {IMAGES}
    if method == "dino":  # the warm-up and the frozen layer end at plain's epochs, in steps
        temps = [r["teacher_temp"] for r in plain["steps"]]
        assert temps[0] == 0.04 and temps[2 * (IMAGES // BATCH)] == 0.07
        assert sum(r["frozen"] for r in plain["steps"]) == IMAGES // BATCH
    if method in ("byol", "dino"):
        moms = [r["momentum"] for r in plain["steps"]]
        assert moms[0] < moms[-1] < 1.0


def test_the_warmup_counts_plain_epochs_even_without_a_budget() -> None:
    optim = resolve_optim("simclr", {"warmup_epochs": 1})
    kw: dict[str, Any] = {"images": IMAGES, "batch_size": BATCH, "epochs": EPOCHS}
    plain = plan_schedule("simclr", {}, optim, items=IMAGES, budget_steps=None, **kw)
    longer = plan_schedule("simclr", {}, optim, items=IMAGES + PAIRS, budget_steps=None, **kw)
    assert plain.warmup_steps == longer.warmup_steps == IMAGES // BATCH
    assert longer.total_steps == (IMAGES + PAIRS) // BATCH * EPOCHS > plain.total_steps


def test_small_data_gets_cifar_moco_and_explicit_hparams_win() -> None:
    small, large = DataScale(50_000), DataScale(1_281_167)
    assert small.small and not large.small
    assert fit_hparams("mocov2", {}, 50_000, scale=small) == {"queue_size": 4096, "momentum": 0.99}
    assert fit_hparams("mocov2", {}, 1_281_167, scale=large) == {}
    # an explicit value wins over the scale's, and the queue still fits the data
    mine = fit_hparams("mocov2", {"momentum": 0.999}, 1000, scale=DataScale(1000))
    assert mine == {"momentum": 0.999, "queue_size": 1000}
    assert fit_hparams("simclr", {}, 50_000, scale=small) == {}


def test_a_run_crowded_with_pair_items_warns_with_the_fix() -> None:
    crowded = {"original": 10_000, "semantic": 772_632, "augmentation": 0, "curated": 0}
    text = pair_share_warning(crowded)
    assert text is not None and "77.3 per original" in text
    assert "mining.lo" in text and "mining.m" in text
    assert pair_share_warning({"original": 1359, "semantic": 680}) is None
    assert pair_share_warning({"original": 0, "curated": 500}) is None  # curated alone: chosen


class _FakeTrainer:
    """What `train_epoch` needs of a Trainer, recording each step's (epoch, step, batch)."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.pending = 0

    def train_step(self, batch: dict[str, Any], epoch: int, step: int) -> None:
        self.calls.append((epoch, step, int(batch["id"][0])))
        self.pending += 1

    def read_metrics(self) -> dict[str, float]:
        n, self.pending = self.pending, 0
        return {"loss": 1.0, "lr": 0.1, "steps": float(n)}


def _batches(n: int) -> Iterator[dict[str, Any]]:
    return iter({"id": np.array([i])} for i in range(n))


def test_the_method_reads_the_reference_epoch_and_segments_keep_the_order() -> None:
    t = _FakeTrainer()
    it = _batches(7)  # one data epoch of 7 steps, the second of the run (steps 7..13)
    first = train_epoch(t, it, 1, 7, reference_steps=5, max_steps=3)  # type: ignore[arg-type]
    rest = train_epoch(t, it, 1, 10, reference_steps=5)  # type: ignore[arg-type]
    assert [c[2] for c in t.calls] == list(range(7))  # no batch skipped or repeated
    assert [c[1] for c in t.calls] == list(range(7, 14))
    assert [c[0] for c in t.calls] == [s // 5 for s in range(7, 14)]  # reference epochs
    assert first["steps"] == 3 and rest["steps"] == 4 and rest["next_step"] == 14
    whole = combine([first, rest])
    assert whole["steps"] == 7 and whole["last_step"] == 13


def test_runs_of_different_epoch_lengths_report_at_the_same_steps() -> None:
    every, total = 4, 12  # the plain run's epoch is 4 steps; a pair arm's 5 or 6
    reported: dict[int, list[int]] = {}
    for spe in (4, 5, 6):
        t, at = _FakeTrainer(), reported.setdefault(spe, [])
        for epoch in range(-(-total // spe)):
            steps = min(spe, total - epoch * spe)
            stats = train_to_milestones(
                t,  # type: ignore[arg-type]
                _batches(steps),
                epoch,
                epoch * spe,
                steps,
                every=every,
                total=total,
                reference_steps=4,
                on_report=lambda _s, step, at=at: at.append(step),
            )
            assert stats["steps"] == steps
        assert [c[1] for c in t.calls] == list(range(total))
    assert reported == {4: [4, 8, 12], 5: [4, 8, 12], 6: [4, 8, 12]}
    assert segment_ends(5, 5, every, total) == [8, 10] and segment_ends(0, 5, None, total) == [5]
