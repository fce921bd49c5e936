"""Re-mining on Ray Train (the session's cluster): a two-rank streamed run; a worker killed
during a round (slow). The pipeline's sp-remine arm is checked by `check_sp_remine` inside the
every-arm pipeline test (`tests/test_pipeline.py`), which runs it beside sp at equal steps."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sepp_ray.data.dataset import ImageDataset
from sepp_ray.data.ingest import ingest
from sepp_ray.data.sources import SourceOptions, open_source
from sepp_ray.methods import create_method
from sepp_ray.mining.command import mine_command
from sepp_ray.mining.encoder import EncoderConfig
from sepp_ray.mining.mine import MineConfig
from sepp_ray.models.checkpoint import load_backbone
from sepp_ray.storage import read_manifest
from sepp_ray.train.census import census
from sepp_ray.train.dataplane import image_files
from sepp_ray.train.driver import PretrainConfig, pretrain
from sepp_ray.train.items import PairsConfig, plan_items
from sepp_ray.train.remine import RemineSpec, mining_config_of, round_uri
from sepp_ray.train.remine_round import Rounds
from sepp_ray.train.remine_targets import ResidentTarget
from sepp_ray.train.resident import (
    PlaneChoice,
    ResidentFeed,
    ResidentItems,
    ResidentPlan,
    decode_chunk,
)
from sepp_ray.train.state import checkpoint_uri, load_training_state

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _dataset_with_pairs(base: Path, n: int, chunk: int, k: int) -> tuple[str, str]:
    """``n`` synthetic 16 px images and the pairs of ``k`` anchors, each anchor's nearest image
    (the window [-1, 0.9999], m = 1: k pairs a round)."""
    images, pairs = str(base / "syn"), str(base / "pairs")
    ingest(open_source("synthetic", options=SourceOptions(n=n, size=16, chunk_size=chunk)), images)
    mine_command(
        images,
        pairs,
        EncoderConfig(name="resnet18", cifar_stem=True, image_size=16),
        MineConfig(lo=-1.0, hi=0.9999, k=k, m=1),
        splits=["train"],
        actors=None,
        overwrite=False,
        config={},
    )
    return images, pairs


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, ray_cluster: str) -> tuple[str, str]:
    return _dataset_with_pairs(tmp_path_factory.mktemp("remine"), 120, 40, 20)


def _cfg(
    images: str, pairs: str | None, out: Path, remine: int | None, **kw: object
) -> PretrainConfig:
    settings: dict[str, object] = dict(
        dataset=images,
        out=str(out),
        backbone="test_resnet",
        epochs=3,
        batch_size=32,
        warmup_epochs=1,
        knn_every=1,
        knn_k=20,
        base_lr=0.1,
        cpus_per_worker=0.5,
        keep_checkpoints=0,  # keep every checkpoint: round 1's last one is mined from below
        pairs=PairsConfig(pairs=pairs, remine_every=remine),
    )
    settings.update(kw)
    return PretrainConfig(**settings)  # type: ignore[arg-type]


def _pairs(uri: str) -> list[tuple[int, int]]:
    m = read_manifest(uri)
    t = pq.read_table(str(Path(uri) / m["files"]["pairs"]))
    return sorted(zip(t["anchor_id"].to_pylist(), t["positive_id"].to_pylist(), strict=True))


def _remine_from_checkpoint(images: str, pairs: str, ckpt: str, out: Path) -> str:
    """Round 2 mined again in this process from round 1's last checkpoint."""
    ds = ImageDataset.open(images)
    chunks = census(image_files(ds), "images", "train", None)
    parts = [decode_chunk(c, "train", (16, 16)) for c in chunks]
    n = sum(len(p["id"]) for p in parts)
    items = ResidentItems.of(plan_items(None, None, PairsConfig(mode="none"), 0), 1)
    choice = PlaneChoice("resident", "test", 0)
    feed = ResidentFeed(ResidentPlan(parts, (16, 16), n, items, 32, 1, 1, 0, choice), "cpu")
    torch.manual_seed(0)
    method = create_method("simclr", backbone="test_resnet", cifar_stem=True)
    state, _ = load_training_state(ckpt)
    method.load_state_dict(state["method"])
    _, meta, _ = load_backbone(ckpt)
    norm = (torch.tensor(meta.mean).view(1, 3, 1, 1), torch.tensor(meta.std).view(1, 3, 1, 1))
    spec = RemineSpec(
        every=1,
        encoder="online",
        mining=mining_config_of(pairs),
        pairs=PairsConfig(pairs=pairs, remine_every=1),
        first_pairs=pairs,
        dataset=images,
        split="train",
        classes=ds.classes,
        seed=0,
    )
    assert Rounds(spec, str(out), ResidentTarget(feed, spec), method, norm, 16).before_epoch(1)
    return round_uri(str(out), 2)


def check_sp_remine(m: dict, once: dict, report: str, tmp_path: Path) -> None:
    """The pipeline's sp-remine run ``m`` (every-arm test of `tests/test_pipeline.py`, two
    epochs, a round every epoch, reports every step) against its sp run ``once``, the same run
    without re-mining: the same steps and learning rate at every step, round 2 mined from round
    1's last checkpoint (mined again here from it: the same pairs), the rounds in the report."""
    assert m["total_steps"] == once["total_steps"]
    assert [h["step"] for h in m["history"]] == [h["step"] for h in once["history"]]
    assert [h["lr"] for h in m["history"]] == [h["lr"] for h in once["history"]]
    rounds = m["rounds"]
    assert [(r["round"], r["start_epoch"]) for r in rounds] == [(1, 0), (2, 1)]
    pairs = rounds[0]["pairs"]
    assert rounds[0]["encoder"] == "sampler" and pairs == once["config"]["pairs"]["pairs"]
    assert all(r["num_pairs"] == 20 and 0.0 <= r["precision"] <= 1.0 for r in rounds)
    assert m["remine"]["every"] == 1 and m["remine"]["encoder"] == "online"
    spe = m["steps_per_epoch"]  # every step's report names the round it trained on
    assert [h["round"] for h in m["history"]] == [1] * spe + [2] * (m["total_steps"] - spe)
    run = Path(m["final_checkpoint"]).parent.parent
    r2 = read_manifest(round_uri(str(run), 2))
    assert r2["encoder_checkpoint_epoch"] == 1 and r2["config"] == read_manifest(pairs)["config"]
    assert _pairs(round_uri(str(run), 2)) != _pairs(pairs)
    images = m["config"]["dataset"]
    again = _remine_from_checkpoint(images, pairs, checkpoint_uri(str(run), 1), tmp_path / "again")
    assert _pairs(again) == _pairs(round_uri(str(run), 2))
    assert "rounds" not in once
    assert "## Re-mining rounds" in report
    for r in rounds:
        line = f"| sp-remine | 0 | {r['round']} | {r['start_epoch'] + 1} | {r['encoder']} | 20 |"
        assert f"{line} {r['precision']:.3f} |" in report


def test_a_streamed_run_re_mines_reading_its_split_in_tasks(
    data: tuple[str, str], tmp_path: Path
) -> None:
    """The streaming plane: the ranks read the split to embed it, rank 0 writes the round's
    item table, both ranks stream from it; the pairs equal those mined from the same weights
    on the resident plane."""
    images, pairs = data
    run = tmp_path / "run"
    m = pretrain(_cfg(images, pairs, run, 1, epochs=2, workers=2, data_plane="stream"))
    assert m["data_plane"]["mode"] == "stream"
    assert [(r["round"], r["num_pairs"]) for r in m["rounds"]] == [(1, 20), (2, 20)]
    assert [h["round"] for h in m["history"]] == [1, 2]
    assert (run / "rounds" / "items-002" / "items").is_dir()  # the round's own item table
    assert m["same_image_negatives"] == 0 and m["pair_items"] > 0
    # each anchor's positive is its nearest image under the checkpoint's weights (the batches
    # embedded differ from one process' in size, so near-ties may break the other way)
    sims = _similarities(images, checkpoint_uri(str(run), 1))
    m2 = read_manifest(round_uri(str(run), 2))
    t = pq.read_table(str(run / "rounds" / "round-002" / m2["files"]["pairs"]))
    cols = (t[c].to_pylist() for c in ("anchor_id", "positive_id", "similarity"))
    for a, p, sim in zip(*cols, strict=True):
        assert abs(sims[a][p] - sim) < 1e-4
        best = max(v for k, v in sims[a].items() if k != a and v <= m2["hi"])
        assert sims[a][p] >= best - 1e-4


def _similarities(images: str, ckpt: str) -> dict[int, dict[int, float]]:
    """Cosine similarities between every two training images under ``ckpt``'s backbone."""
    from sepp_ray.models.encode import encode

    ds = ImageDataset.open(images)
    parts = [
        decode_chunk(c, "train", (16, 16)) for c in census(image_files(ds), "images", "train", None)
    ]
    ids = np.concatenate([p["id"] for p in parts]).tolist()
    pixels = torch.from_numpy(np.concatenate([p["image"] for p in parts])).permute(0, 3, 1, 2)
    model, meta, _ = load_backbone(ckpt)
    norm = (torch.tensor(meta.mean).view(1, 3, 1, 1), torch.tensor(meta.std).view(1, 3, 1, 1))
    f = torch.nn.functional.normalize(encode(model, pixels, *norm, torch.device("cpu")), dim=1)
    s = (f @ f.T).tolist()
    return {a: dict(zip(ids, row, strict=True)) for a, row in zip(ids, s, strict=True)}


@pytest.mark.slow
def test_a_worker_killed_during_a_round_resumes_with_the_same_pairs(tmp_path: Path) -> None:
    """3,000 images: the round (embedding them, searching 300 anchors) outlasts the moment
    between rank 0 saying it started and the kill, which lands in the round."""
    images, pairs = _dataset_with_pairs(tmp_path, 3000, 500, 300)
    run = tmp_path / "run"
    round_2 = Path(round_uri(str(run), 2)) / "manifest.json"
    killed: list[bool] = []  # whether round 2 was complete when its worker was killed

    def kill_once_round_1_is_saved() -> None:
        # rank 0 says when the round starts (the driver's progress bar shows it)
        deadline = time.time() + 600
        progress = run / "progress.json"
        while time.time() < deadline:
            try:
                if "re-mining round 2" in progress.read_text():
                    break
            except OSError:
                pass
            time.sleep(0.01)
        for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "RayTrainWorker" in cmdline:
                os.kill(pid, signal.SIGKILL)
                killed.append(round_2.exists())
                return

    t = threading.Thread(target=kill_once_round_1_is_saved, daemon=True)
    t.start()
    m = pretrain(_cfg(images, pairs, run, 1, epochs=2, max_failures=2, batch_size=256))
    t.join(timeout=5)
    assert killed == [False], "the kill must land before round 2 was complete"
    # restarted from round 1's last checkpoint when Ray had recorded it before the kill (its
    # controller records reports a moment later), else from the start (a record of the first
    # attempt then has no checkpoint to live in): the round is mined again either way, from
    # the checkpoint of round 1's last epoch
    assert m["loop_starts_at_epoch"] in ([0], [0, 1])
    again = _remine_from_checkpoint(images, pairs, checkpoint_uri(str(run), 1), tmp_path / "again")
    assert _pairs(again) == _pairs(round_uri(str(run), 2))
    assert [r["round"] for r in m["rounds"]] == [1, 2]
