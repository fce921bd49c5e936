"""Mining on a simulated 3-node cluster and training on a 2-node one (ray.cluster_utils.Cluster)
equal one node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from sepp_ray.data.ingest import ingest
from sepp_ray.data.sources import SourceOptions, open_source
from sepp_ray.mining.command import mine_command
from sepp_ray.mining.encoder import EncoderConfig
from sepp_ray.mining.mine import MineConfig
from sepp_ray.mining.tables import read_pairs
from sepp_ray.train.driver import PretrainConfig, pretrain

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a simulated 3-node cluster: minutes on 2 cores
@pytest.mark.usefixtures("ray_cluster")
def test_three_nodes_give_the_same_pairs_as_one(tmp_path: Path) -> None:
    images = str(tmp_path / "img")
    ingest(open_source("synthetic", options=SourceOptions(n=160, size=16, chunk_size=40)), images)
    enc = EncoderConfig(name="resnet18", cifar_stem=True, image_size=16, batch_size=32)
    mining = MineConfig(lo=-1.0, hi=0.9999, k=0.5, m=2, actors=3)
    one = mine_command(
        images,
        str(tmp_path / "one"),
        enc,
        mining,
        splits=["train"],
        actors=None,
        overwrite=False,
        config={},
        rows_per_file=50,
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.multinode_mine",
            images,
            str(tmp_path / "three"),
            json.dumps(asdict(enc)),
            json.dumps(asdict(mining)),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    nodes = json.loads(r.stdout.split("NODES", 1)[1].splitlines()[0])
    assert len(nodes) == 3, "the three search actors should spread over the three nodes"
    assert one["num_pairs"] > 0
    assert read_pairs(str(tmp_path / "one")).equals(read_pairs(str(tmp_path / "three")))


@pytest.mark.slow  # two trainings and a 2-node cluster: minutes
@pytest.mark.usefixtures("ray_cluster")
def test_training_on_two_nodes_equals_one_node(tmp_path: Path) -> None:
    """2-rank DDP with its ranks on two nodes trains the same model as on one node."""
    images = str(tmp_path / "img")
    ingest(open_source("synthetic", options=SourceOptions(n=96, size=16, chunk_size=48)), images)
    cfg = PretrainConfig(
        dataset=images,
        out=str(tmp_path / "one"),
        backbone="test_resnet",
        epochs=2,
        batch_size=32,
        workers=2,
        warmup_epochs=0,
        checkpoint_every=2,
        knn_monitor=False,
        shuffle_buffer=0,
        cpus_per_worker=0.5,
    )
    one = pretrain(cfg)
    assert len(set(one["worker_nodes"])) == 1
    two_cfg = asdict(replace(cfg, out=str(tmp_path / "two"), cpus_per_worker=1.5, decode_cpus=0.5))
    r = subprocess.run(
        [sys.executable, "-m", "tests.multinode_train", json.dumps(two_cfg)],
        capture_output=True,
        text=True,
        timeout=400,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout.split("MANIFEST", 1)[1].splitlines()[0])
    assert len(set(two["worker_nodes"])) == 2, "the two ranks should run on two nodes"
    losses_one = [h["loss"] for h in one["history"]]
    losses_two = [h["loss"] for h in two["history"]]
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
