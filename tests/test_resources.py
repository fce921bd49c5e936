"""Every GPU stage asks the autoscaler for its GPUs, waits, and fails clearly, on the session's
GPU-less cluster: the request Ray's autoscaler would get is recorded, and no GPU ever comes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sepp_ray import resources
from sepp_ray.errors import SeppError
from sepp_ray.resources import WAIT_ENV, ensure_gpus, gpu_wait, stage_gpus
from sepp_ray.storage import Location, begin_write, finish_write

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, float]]]:
    """What the autoscaler is asked for, in order (the real call is made too)."""
    seen: list[list[dict[str, float]]] = []
    real = resources._request

    def record(bundles: list[dict[str, float]]) -> None:
        seen.append(bundles)
        real(bundles)

    monkeypatch.setattr(resources, "_request", record)
    monkeypatch.setattr(resources, "POLL_S", 0.2)
    return seen


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A small image dataset, a checkpoint and an embeddings location."""
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import SourceOptions, open_source
    from sepp_ray.models.backbones import create_backbone
    from sepp_ray.models.checkpoint import BackboneMeta, save_backbone

    root = tmp_path_factory.mktemp("gpus")
    images = str(root / "images")
    ingest(open_source("synthetic", options=SourceOptions(n=40, size=16)), images)
    model, dim = create_backbone("test_resnet", cifar_stem=True)
    ckpt = str(root / "ckpt")
    save_backbone(ckpt, model, BackboneMeta("test_resnet", True, dim, 16))
    return {"images": images, "ckpt": ckpt, "emb": fake_embeddings(str(root / "emb"))}


def fake_embeddings(uri: str, n: int = 20, dim: int = 4) -> str:
    """A complete embeddings location (the format `sepp embed` writes), made by hand."""
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    table = pa.table(
        {
            "id": pa.array(np.arange(n), pa.int64()),
            "label": pa.array(np.arange(n) % 2, pa.int32()),
            "split": pa.array(["train"] * n),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim),
        }
    )
    loc = begin_write(uri)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    loc.write_bytes("embeddings/part-0.parquet", buf.getvalue())
    finish_write(
        loc,
        {
            "kind": "embeddings",
            "num_embeddings": n,
            "dim": dim,
            "splits": ["train"],
            "dataset": {"uri": "x", "classes": ["a", "b"]},
            "encoder": {},
            "files": [{"path": "embeddings/part-0.parquet", "rows": n}],
        },
    )
    return uri


def asked(requests: list[list[dict[str, float]]], n: int, cpus: float = 1.0) -> bool:
    """The autoscaler got n one-GPU bundles, then the request was withdrawn."""
    return requests == [[{"GPU": 1, "CPU": cpus}] * n, []]


def test_wait_comes_from_the_option_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WAIT_ENV, raising=False)
    assert gpu_wait() == 0.0
    monkeypatch.setenv(WAIT_ENV, "900")
    assert gpu_wait() == 900.0 and gpu_wait(5) == 5.0 and gpu_wait(0) == 0.0
    monkeypatch.setenv(WAIT_ENV, "soon")
    with pytest.raises(SeppError, match=f"{WAIT_ENV}='soon' is not a number"):
        gpu_wait()
    with pytest.raises(SeppError, match="gpu_wait_s must be >= 0"):
        gpu_wait(-1)


def test_no_wait_fails_at_once_without_asking(requests: list[Any]) -> None:
    with pytest.raises(SeppError) as err:
        ensure_gpus(3, 0.0, what="GPU workers", fix="lower workers")
    assert "3 GPU workers asked for, the cluster has 0 GPUs: lower workers" in str(err.value)
    assert "after waiting" not in str(err.value) and requests == []
    assert ensure_gpus(0, 0.0, what="x", fix="y") == 0  # nothing needed: nothing asked
    # a CPU cluster not told to wait runs the stage on CPUs, as on a laptop
    assert stage_gpus(4, 0.0, what="actors", fix="lower actors") == 0 and requests == []


def test_a_wait_asks_for_bundles_then_withdraws_and_fails(requests: list[Any]) -> None:
    with pytest.raises(SeppError, match="2 GPU workers asked for, .* after waiting 1 s") as err:
        ensure_gpus(2, 1.0, what="GPU workers", fix="lower workers", cpus_per_gpu=4)
    assert asked(requests, 2, cpus=4.0)
    assert "min_workers" in str(err.value) and WAIT_ENV in str(err.value)


def test_embed_asks(data: dict[str, str], requests: list[Any], tmp_path: Path) -> None:
    from sepp_ray.mining.embed import embed
    from sepp_ray.mining.encoder import EncoderConfig

    enc = EncoderConfig(name="resnet18", cifar_stem=True, image_size=16, batch_size=8)
    with pytest.raises(SeppError, match="2 embedding actors .* after waiting 1 s: lower actors"):
        embed(data["images"], str(tmp_path / "e"), enc, actors=2, gpu_wait_s=1)
    assert asked(requests, 2)
    assert not (tmp_path / "e").exists(), "no output claimed before the GPUs are there"


def test_mine_asks(
    data: dict[str, str], requests: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sepp_ray.mining.mine import MineConfig, run_search

    monkeypatch.setenv(WAIT_ENV, "1")  # mining has no option of its own: the cluster's wait
    with pytest.raises(SeppError, match="1 search actors .* after waiting 1 s"):
        run_search(data["emb"], MineConfig(k=0.5))
    assert asked(requests, 1)


def test_eval_asks(data: dict[str, str], requests: list[Any], tmp_path: Path) -> None:
    from sepp_ray.eval.command import EvalConfig, run_eval

    cfg = EvalConfig(
        checkpoints=[data["ckpt"]],
        dataset=data["images"],
        out=str(tmp_path / "ev"),
        protocols=["knn"],
        actors=3,
        gpu_wait_s=1,
    )
    with pytest.raises(SeppError, match="3 evaluation actors .* after waiting 1 s"):
        run_eval(cfg)
    assert asked(requests, 3)
    assert not (tmp_path / "ev").exists()


def test_pretrain_asks_on_a_cluster_scaled_to_no_gpu(
    data: dict[str, str], requests: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """use_gpu unset and the cluster's wait set: the run wants GPUs even though none is up."""
    from sepp_ray.train.driver import PretrainConfig, pretrain

    monkeypatch.setenv(WAIT_ENV, "1")
    cfg = PretrainConfig(
        dataset=data["images"],
        out=str(tmp_path / "p"),
        backbone="test_resnet",
        batch_size=8,
        workers=2,
        cpus_per_worker=0.5,
    )
    with pytest.raises(SeppError, match="2 GPU workers asked for, .* after waiting 1 s"):
        pretrain(cfg)
    assert asked(requests, 2, cpus=0.5)
    assert not (Location(cfg.out).exists("manifest.json"))


def test_sweep_asks_for_its_concurrent_trials(
    requests: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sepp_ray.train.driver import PretrainConfig
    from sepp_ray.tune.space import SweepConfig
    from sepp_ray.tune.sweep import _resources

    monkeypatch.setenv(WAIT_ENV, "1")
    c = SweepConfig(out=str(tmp_path / "sw"), pretrain=PretrainConfig(workers=2), max_concurrent=2)
    with pytest.raises(SeppError, match=r"4 GPUs for the trials \(gpus_per_trial x max_concur"):
        _resources(c)
    assert asked(requests, 4)


def test_cpu_stages_stay_on_cpus_without_a_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (no wait) keeps today's behaviour on a CPU cluster: 0 GPUs, CPU trials."""
    from sepp_ray.tune.space import SweepConfig
    from sepp_ray.tune.sweep import _resources

    monkeypatch.delenv(WAIT_ENV, raising=False)
    workers, use_gpu, conc, _ = _resources(SweepConfig(out="runs/x"))
    assert (workers, use_gpu) == (1, False) and conc >= 1
