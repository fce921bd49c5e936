"""Pretraining on Ray Train (the session's cluster, gloo on CPU): DDP, pairs, checkpoints,
resume after a crash, recovery from a killed worker, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ray.train import Result

from sepp_ray.data.ingest import ingest
from sepp_ray.data.sources import SourceOptions, open_source
from sepp_ray.errors import SeppError
from sepp_ray.mining.command import mine_command
from sepp_ray.mining.encoder import EncoderConfig
from sepp_ray.mining.mine import MineConfig
from sepp_ray.models.checkpoint import load_backbone
from sepp_ray.storage import Location, read_manifest
from sepp_ray.train.driver import PretrainConfig, pretrain
from sepp_ray.train.items import PairsConfig
from sepp_ray.train.state import list_checkpoints

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, ray_cluster: str) -> tuple[str, str]:
    base = tmp_path_factory.mktemp("pretrain")
    images = str(base / "syn")
    ingest(open_source("synthetic", options=SourceOptions(n=150, size=16, chunk_size=50)), images)
    pairs = str(base / "pairs")
    mine_command(
        images,
        pairs,
        EncoderConfig(name="resnet18", cifar_stem=True, image_size=16),
        MineConfig(lo=-1.0, hi=0.9999, k=24, m=1),
        splits=["train"],
        actors=None,
        overwrite=False,
        config={},
    )
    return images, pairs


def _cfg(images: str, out: Path, **kw: object) -> PretrainConfig:
    return PretrainConfig(**_settings(images, out, **kw))  # type: ignore[arg-type]


def _settings(images: str, out: Path, **kw: object) -> dict[str, object]:
    base: dict[str, object] = dict(
        dataset=images,
        out=str(out),
        backbone="test_resnet",
        epochs=2,
        batch_size=32,
        warmup_epochs=1,
        checkpoint_every=1,
        knn_every=1,
        knn_k=20,
        base_lr=0.1,
        shuffle_buffer=0,
        cpus_per_worker=0.5,
    )
    base.update(kw)
    return base


def test_two_worker_ddp_with_semantic_pairs(data: tuple[str, str], tmp_path: Path) -> None:
    images, pairs = data
    out = tmp_path / "run"
    m = pretrain(_cfg(images, out, workers=2, pairs=PairsConfig(pairs=pairs, mode="both")))
    assert m["items"]["semantic"] == 24 and m["multi_positive"] is True
    # 150 images of 16 px fit in memory: chosen by size, said in the manifest
    assert m["data_plane"]["mode"] == "resident" and m["decode"] == "resident"
    assert m["workers"] == 2 and m["epochs"] == 2
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert [h["step"] for h in m["history"]] == [m["steps_per_epoch"], 2 * m["steps_per_epoch"]]
    # the schedule follows the plain run's epoch (the split's images), not this arm's items
    sched = m["schedule"]
    assert sched["reference_steps_per_epoch"] == sched["reference_images"] // 32
    assert sched["warmup_steps"] == sched["reference_steps_per_epoch"]  # warmup_epochs=1
    assert all(0.0 <= h["knn_top1"] <= 1.0 for h in m["history"])
    assert [e for e, _ in list_checkpoints(str(out))] == [1, 2]
    # Ray Train lists the run's checkpoints, each with its report's kNN monitor result; the
    # manifest's best checkpoint is the one with the best, its final one Ray's newest
    ray_run = Result.from_path(str(out / "checkpoints"))
    listed = {Path(c.path).name: r for c, r in ray_run.best_checkpoints}
    assert sorted(listed) == ["epoch-00001", "epoch-00002"]
    for h in m["history"]:
        assert listed[f"epoch-{h['epoch']:05d}"]["knn_top1"] == h["knn_top1"]
    best = max(listed, key=lambda name: listed[name]["knn_top1"])
    assert m["best_checkpoint"] == str(out / "checkpoints" / best)
    assert m["final_checkpoint"] == str(out / "checkpoints" / Path(ray_run.checkpoint.path).name)
    model, meta, _ = load_backbone(m["final_checkpoint"])
    assert meta.name == "test_resnet" and meta.image_size == 16
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((out / "progress.json").read_text())["epoch"] == 2  # the driver's bar
    # the checkpoint is a sampler at once: mine with it
    mined = mine_command(
        images,
        str(tmp_path / "p2"),
        EncoderConfig(checkpoint=m["final_checkpoint"]),
        MineConfig(lo=-1.0, hi=0.9999, k=10),
        splits=["train"],
        actors=None,
        overwrite=False,
        config={},
    )
    assert mined["encoder"]["identity"].startswith("sepp-checkpoint:test_resnet")


def test_a_crashed_run_resumes_from_its_last_checkpoint(
    data: tuple[str, str], tmp_path: Path
) -> None:
    images, _ = data
    out = tmp_path / "run"
    # the streaming plane, forced: its resume is the one that reads row groups again
    first = pretrain(_cfg(images, out, epochs=1, data_plane="stream"))
    assert first["data_plane"]["mode"] == "stream" and first["decode"] == "full"
    # the driver dies after epoch 1: no manifest, the marker of an unfinished write
    loc = Location(str(out))
    loc.fs.rm(loc.join("manifest.json"))
    loc.write_bytes("_SEPP_WRITING", b"{}")
    second = pretrain(_cfg(images, out, epochs=2, data_plane="stream"))
    assert second["resumed_from_epoch"] == 1 and second["loop_starts_at_epoch"] == [0, 1]
    assert second["history"][0] == first["history"][0]  # epoch 1 was not trained again
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    with pytest.raises(SeppError, match="already holds a complete result"):
        pretrain(_cfg(images, out, epochs=2))


@pytest.mark.slow  # end to end through Ray Train; the step's NaN handling is tested fast
def test_a_diverging_run_stops_with_a_clear_error_and_keeps_the_good_checkpoint(
    data: tuple[str, str], tmp_path: Path
) -> None:
    images, _ = data
    out = tmp_path / "run"
    pretrain(_cfg(images, out, epochs=1))
    loc = Location(str(out))  # as after a crash: continue the run, now with an absurd lr
    loc.fs.rm(loc.join("manifest.json"))
    loc.write_bytes("_SEPP_WRITING", b"{}")
    with pytest.raises(SeppError, match="cannot resume .*optimizer 'lars' -> 'sgd'"):
        pretrain(_cfg(images, out, epochs=3, optimizer="sgd"))
    with pytest.raises(SeppError, match="(?s)non-finite.*last good checkpoint is kept"):
        pretrain(_cfg(images, out, epochs=3, base_lr=1e30))
    assert [e for e, _ in list_checkpoints(str(out))] == [1]
    assert not (out / "manifest.json").exists()


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_checkpoint(data: tuple[str, str], tmp_path: Path) -> None:
    images, _ = data
    out = tmp_path / "run"
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not _reported(out):  # resumable once Ray has it
            time.sleep(0.2)
        for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "RayTrainWorker" in cmdline:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return

    t = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    t.start()
    m = pretrain(_cfg(images, out, epochs=4, max_failures=2))
    t.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4]
    # the loop started twice: from scratch, then from a checkpoint after the kill
    assert len(m["loop_starts_at_epoch"]) == 2 and m["loop_starts_at_epoch"][0] == 0
    assert m["loop_starts_at_epoch"][1] >= 1
    assert read_manifest(str(out))["final_checkpoint"].endswith("epoch-00004")


@pytest.mark.slow
def test_a_checkpoint_between_fixed_step_reports_reaches_ray_in_a_report_of_its_own(
    data: tuple[str, str], tmp_path: Path
) -> None:
    images, _ = data
    out = tmp_path / "run"
    m = pretrain(_cfg(images, out, report_every_steps=2))
    spe = m["steps_per_epoch"]
    assert spe % 2 == 1  # epoch 1 ends between two reports
    assert [h["step"] for h in m["history"]] == list(range(2, 2 * spe + 1, 2))  # no extra entry
    listed = {
        Path(c.path).name: r for c, r in Result.from_path(str(out / "checkpoints")).best_checkpoints
    }
    assert sorted(listed) == ["epoch-00001", "epoch-00002"]
    first, last = listed["epoch-00001"], listed["epoch-00002"]
    # epoch 1's checkpoint came alone, ranked by a kNN result of its own; the last rode on the
    # run's last report
    assert first["checkpoint_only"] is True and first["step"] == spe and "knn_top1" in first
    assert "checkpoint_only" not in last and last["step"] == 2 * spe and "knn_top1" in last


def _reported(out: Path) -> bool:
    """Whether Ray Train has recorded a checkpoint of the run in ``out`` (its snapshot may be
    absent, or caught half written)."""
    try:
        return Result.from_path(str(out / "checkpoints")).checkpoint is not None
    except Exception:  # noqa: BLE001 - not there yet, or read while Ray writes it
        return False


KILLED_DRIVER = """
import json, os, signal, sys, time
from ray.train import UserCallback
from sepp_ray.train.driver import PretrainConfig, pretrain

class KillDriverAtFirstCheckpoint(UserCallback):
    # runs in the run's controller, once Ray has recorded the report's checkpoint
    def __init__(self, pid):
        self.pid = pid

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is not None:
            os.kill(self.pid, signal.SIGKILL)
            time.sleep(600)  # the run goes no further: it ends with its driver's job

cfg = PretrainConfig(**json.loads(sys.argv[1]))
pretrain(cfg, callbacks=[KillDriverAtFirstCheckpoint(os.getpid())])
"""


@pytest.mark.slow
def test_a_killed_driver_s_run_is_restored_through_ray(
    data: tuple[str, str], tmp_path: Path, ray_cluster: str
) -> None:
    images, _ = data
    out = tmp_path / "run"
    settings = _settings(images, out, epochs=3, keep_checkpoints=0)  # Ray keeps them all
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_DRIVER, json.dumps(settings)],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:].decode(errors="replace")
    assert not (out / "manifest.json").exists()
    assert Path(Result.from_path(str(out / "checkpoints")).checkpoint.path).name == "epoch-00001"
    # the same command again: Ray Train restores the run from its snapshot and hands the
    # workers the checkpoint of epoch 1, so the loop starts at epoch 1, not 0
    m = pretrain(PretrainConfig(**settings))  # type: ignore[arg-type]
    assert m["resumed_from_epoch"] == 1 and m["loop_starts_at_epoch"] == [0, 1]
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    restored = Result.from_path(str(out / "checkpoints"))
    assert Path(restored.checkpoint.path).name == "epoch-00003"
    # one record across both drivers: the checkpoint the first one reported is listed too
    listed = sorted(Path(c.path).name for c, _ in restored.best_checkpoints)
    assert listed == ["epoch-00001", "epoch-00002", "epoch-00003"]


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"method": "mocov9"}, "mocov9"),
        ({"hparams": {"temprature": 0.1}}, "temprature"),
        ({"drop_augment": ["sparkle"]}, "sparkle"),
        ({"batch_size": 100_000}, "exceeds the"),
        ({"workers": 3, "batch_size": 32}, "divide evenly"),
        ({"split": "validation"}, "split 'validation' not in"),
    ],
)
def test_bad_input_fails_before_training(
    data: tuple[str, str], tmp_path: Path, kw: dict, message: str
) -> None:
    images, _ = data
    with pytest.raises(SeppError, match=message):
        pretrain(_cfg(images, tmp_path / "bad", **kw))
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_gpu_workers_the_cluster_lacks_are_waited_for_then_refused(
    data: tuple[str, str], tmp_path: Path
) -> None:
    images, _ = data  # the session cluster has no GPU: none will come
    t0 = time.monotonic()
    with pytest.raises(SeppError, match="2 GPU workers asked for, .* after waiting 2 s"):
        pretrain(_cfg(images, tmp_path / "gpu", workers=2, use_gpu=True, gpu_wait_s=2))
    assert time.monotonic() - t0 >= 2
    with pytest.raises(SeppError, match="set gpu_wait_s on an autoscaling cluster"):
        pretrain(_cfg(images, tmp_path / "gpu", workers=2, use_gpu=True))
    assert not (tmp_path / "gpu" / "manifest.json").exists()


def test_pairs_from_another_dataset_are_refused(data: tuple[str, str], tmp_path: Path) -> None:
    images, pairs = data
    other = str(tmp_path / "other")
    ingest(open_source("synthetic", options=SourceOptions(n=40, size=16, seed=9)), other)
    with pytest.raises(SeppError, match=r"image id\(s\) absent"):
        pretrain(_cfg(other, tmp_path / "o", batch_size=8, pairs=PairsConfig(pairs=pairs)))
