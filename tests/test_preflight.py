"""The pre-flight memory check on CPU, with a tiny memory limit standing in for a small GPU:
it fails fast on an impossible batch, names a batch that fits, changes nothing of the model or
its random state, and the driver turns the error rank 0 leaves into a SeppError."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch

from sepp_ray.data.augment import GPUAugment
from sepp_ray.data.recipes import get_recipe
from sepp_ray.errors import SeppError
from sepp_ray.methods import create_method, method_hparams
from sepp_ray.storage import Location
from sepp_ray.train.optim import build_optimizer
from sepp_ray.train.preflight import (
    PREFLIGHT_FAILED,
    GiB,
    check_preflight,
    find_fit,
    run_preflight,
    step_peak,
)
from sepp_ray.train.rng import rng_state
from sepp_ray.train.state import list_checkpoints
from sepp_ray.train.step import StepConfig, Trainer, prepare_loss_module

SIZE = 16


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trainer(method: str = "simclr") -> Trainer:
    torch.manual_seed(0)
    small = {"proj_hidden_dim": 32, "proj_output_dim": 16}
    hp = {k: v for k, v in small.items() if k in {f.name for f in fields(method_hparams(method))}}
    m = create_method(method, backbone="test_resnet", cifar_stem=True, **hp)
    loss_module = prepare_loss_module(m, "cpu")
    augment = GPUAugment(get_recipe(m.default_recipe, SIZE), seed=0)
    optimizer = build_optimizer("sgd", m, lr=0.1, weight_decay=0.0)
    return Trainer(loss_module, m, augment, optimizer, StepConfig(amp="off"), 10, 1, base_lr=0.1)


def preflight(
    t: Trainer, out: Path, local_batch: int, limit: int | None, rank: int = 0, **kw: Any
) -> bool:
    """The worker's call: four workers of test_resnet at SIZE px."""
    return run_preflight(
        t,
        rank,
        out=str(out),
        local_batch=local_batch,
        image_size=SIZE,
        workers=4,
        backbone="test_resnet",
        limit_gb=None if limit is None else limit / GiB,
        **kw,
    )


def test_peak_grows_with_the_batch() -> None:
    t = trainer()
    small, big = step_peak(t, 4, SIZE), step_peak(t, 32, SIZE)
    assert 0 < small < big


def test_an_impossible_batch_fails_fast_naming_a_batch_that_fits(tmp_path: Path) -> None:
    t = trainer()
    limit = step_peak(t, 8, SIZE) + 1024  # local batch 8 fits this "device", 64 does not
    assert preflight(t, tmp_path, 64, limit) is True
    with pytest.raises(SeppError) as err:
        check_preflight(Location(str(tmp_path)))
    msg = str(err.value)
    assert "local batch 64 (batch_size 256 over 4 workers) of test_resnet at 16 px" in msg
    assert "local batch 8 fits" in msg and "batch_size=32 with workers=4" in msg
    assert "workers=32" in msg  # or keep batch_size 256 with more workers
    assert not (tmp_path / PREFLIGHT_FAILED).exists(), "the driver removes what it raised"
    check_preflight(Location(str(tmp_path)))  # nothing left: no error


def test_no_batch_fits_a_limit_below_the_weights(tmp_path: Path) -> None:
    t = trainer()
    assert preflight(t, tmp_path, 16, limit=1024)
    error = json.loads((tmp_path / PREFLIGHT_FAILED).read_text())["error"]
    assert "nor does local batch 2" in error and "smaller backbone" in error


def test_a_batch_that_fits_passes_and_other_ranks_write_nothing(tmp_path: Path) -> None:
    t = trainer()
    assert preflight(t, tmp_path, 8, limit=None) is False
    assert preflight(t, tmp_path, 64, limit=1024, rank=1) is True
    assert not (tmp_path / PREFLIGHT_FAILED).exists()  # only rank 0 writes
    assert preflight(t, tmp_path, 64, 1024, enabled=False) is False  # preflight=false


@pytest.mark.parametrize("method", ["simclr", "mocov2", "dino"])
def test_the_check_leaves_weights_buffers_grads_and_rng_untouched(method: str) -> None:
    t = trainer(method)
    before = {k: v.clone() for k, v in t.method.state_dict().items()}
    rng = rng_state(t.augment, t.device)
    attempts = find_fit(t, 16, SIZE, limit_bytes=1024)
    assert [a.batch for a in attempts] == [16, 8, 4, 2] and not any(a.fits for a in attempts)
    after = t.method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "state restored"
    assert all(p.grad is None for p in t.method.parameters())
    again = rng_state(t.augment, t.device)
    assert torch.equal(rng["torch"], again["torch"])
    assert torch.equal(rng["augment"], again["augment"])


@pytest.mark.slow  # a Ray Train start-up (~30 s); the pieces are tested above without Ray
@pytest.mark.usefixtures("ray_cluster")
def test_pretrain_stops_before_training_when_the_batch_cannot_fit(tmp_path: Path) -> None:
    """Through Ray Train, 2 DDP ranks (the loss gathers across them): the run ends at once, with
    no retry, no checkpoint and no manifest, and the driver raises the check's error."""
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import SourceOptions, open_source
    from sepp_ray.train.driver import PretrainConfig, pretrain

    images = str(tmp_path / "img")
    ingest(open_source("synthetic", options=SourceOptions(n=48, size=16)), images)
    cfg = PretrainConfig(
        dataset=images,
        out=str(tmp_path / "run"),
        backbone="test_resnet",
        epochs=1,
        batch_size=16,
        workers=2,
        cpus_per_worker=0.5,
        knn_monitor=False,
        preflight_limit_gb=1e-6,  # ~1 KB: below the weights, so no batch fits
    )
    with pytest.raises(
        SeppError,
        match="pre-flight memory check: local batch 8 "
        r"\(batch_size 16 over 2 workers\) of test_resnet at 16 px",
    ) as err:
        pretrain(cfg)
    assert "nor does local batch 2" in str(err.value)
    run = Location(cfg.out)
    # no result and no checkpoint (the folder itself is Ray Train's run folder, made at start)
    assert not run.exists("manifest.json") and list_checkpoints(cfg.out) == []
    assert not run.exists(PREFLIGHT_FAILED)
