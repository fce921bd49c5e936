"""The curated table trains: mine -> curate (keep same-label pairs) -> export -> one epoch."""

from __future__ import annotations

from pathlib import Path

import pytest

from sepp_ray.curate.command import CurateConfig, run_curate
from sepp_ray.curate.export import read_curated_manifest
from sepp_ray.curate.session import Curation
from sepp_ray.data.ingest import ingest
from sepp_ray.data.sources import SourceOptions, open_source
from sepp_ray.mining.command import mine_command
from sepp_ray.mining.encoder import EncoderConfig
from sepp_ray.mining.mine import MineConfig
from sepp_ray.train.driver import PretrainConfig, pretrain
from sepp_ray.train.items import PairsConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def test_pretrain_one_epoch_on_the_export(tmp_path: Path) -> None:
    images = str(tmp_path / "syn")
    ingest(open_source("synthetic", options=SourceOptions(n=150, size=16, chunk_size=50)), images)
    pairs = str(tmp_path / "pairs")
    mine_command(
        images,
        pairs,
        EncoderConfig(name="resnet18", cifar_stem=True, image_size=16),
        MineConfig(lo=-1.0, hi=0.9999, k=48, m=1),
        splits=["train"],
        actors=None,
        overwrite=False,
        config={},
    )
    cur = Curation(pairs)
    cur.decide_matching({"decision": "accept", "filter": {"agree": "agree"}})
    cur.decide_matching({"decision": "reject", "filter": {"agree": "disagree"}})
    out = str(tmp_path / "curated.parquet")
    assert run_curate(CurateConfig(pairs=pairs, export=out)) == 0
    m = read_curated_manifest(out)
    assert m["precision"] == 1.0 and m["counts"]["exported"] > 0
    cfg = PretrainConfig(
        dataset=images,
        out=str(tmp_path / "run"),
        backbone="test_resnet",
        epochs=1,
        batch_size=32,
        warmup_epochs=0,
        base_lr=0.1,
        shuffle_buffer=0,
        cpus_per_worker=0.5,
        pairs=PairsConfig(curated=out),
    )
    run = pretrain(cfg)
    assert run["items"]["curated"] == m["counts"]["exported"]
