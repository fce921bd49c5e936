"""The semantic sampler on the session's Ray cluster: embed -> mine -> pairs + manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sepp_ray.data.ingest import ingest
from sepp_ray.data.sources import SourceOptions, open_source
from sepp_ray.errors import IncompleteError, SeppError
from sepp_ray.mining.command import mine_command
from sepp_ray.mining.embed import embed
from sepp_ray.mining.encoder import EncoderConfig
from sepp_ray.mining.mine import MineConfig
from sepp_ray.mining.pairs_report import write_report
from sepp_ray.mining.search import search_numpy
from sepp_ray.mining.tables import (
    embedding_ids,
    embedding_labels,
    load_embeddings,
    read_embeddings,
    read_pairs,
)
from sepp_ray.storage import begin_write, finish_write, read_manifest

pytestmark = pytest.mark.usefixtures("ray_cluster")
REPO = Path(__file__).resolve().parents[1]
ENC = EncoderConfig(name="resnet18", cifar_stem=True, image_size=16, batch_size=64)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, ray_cluster: str) -> str:
    uri = str(tmp_path_factory.mktemp("mining") / "syn")
    ingest(open_source("synthetic", options=SourceOptions(n=240, size=16, chunk_size=60)), uri)
    return uri


@pytest.fixture(scope="module")
def embeddings(images: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = str(tmp_path_factory.mktemp("mining") / "emb")
    embed(images, uri, ENC, splits=["train"], rows_per_file=50)
    return uri


def _band(emb_uri: str) -> tuple[float, float]:
    """Thresholds that accept a good share of nearest neighbours (random-init features)."""
    v, _ = load_embeddings(emb_uri)
    s = v.vecs @ v.vecs.T
    np.fill_diagonal(s, -1)
    top = np.unique(s.max(1))
    i, j = len(top) // 4, len(top) - len(top) // 10
    # midpoints between neighbouring values: no similarity sits on a threshold, where float
    # rounding of different backends could legitimately disagree
    return float((top[i] + top[i - 1]) / 2), float((top[j] + top[j - 1]) / 2)


def _mine(src: str, out: str, **kw: object) -> dict:
    cfg = MineConfig(**kw)  # type: ignore[arg-type]
    return mine_command(
        src, out, ENC, cfg, splits=["train"], actors=None, overwrite=False, config={}
    )


def test_embeddings_are_unit_norm_with_labels(embeddings: str, images: str) -> None:
    m = read_manifest(embeddings)
    assert m["kind"] == "embeddings" and m["dim"] == 512
    assert m["encoder"]["identity"].startswith("random-init:resnet18:cifar_stem=True")
    v, labels = load_embeddings(embeddings)
    assert len(v) == m["num_embeddings"] == read_manifest(images)["splits"]["train"]["total"]
    np.testing.assert_allclose(np.linalg.norm(v.vecs, axis=1), 1.0, atol=1e-5)
    assert (labels >= 0).all() and len(m["files"]) >= 3


def test_pairs_match_the_numpy_reference(embeddings: str, tmp_path: Path) -> None:
    lo, hi = _band(embeddings)
    m = _mine(embeddings, str(tmp_path / "p"), lo=lo, hi=hi, k=0.5, m=2, seed=3)
    t = read_pairs(str(tmp_path / "p")).to_pydict()
    assert m["num_pairs"] == len(t["anchor_id"]) > 0
    schema = read_pairs(str(tmp_path / "p")).schema
    assert schema.field("similarity").type == pa.float32()
    v, _ = load_embeddings(embeddings)
    from sepp_ray.mining.anchors import choose_anchors

    anchors = choose_anchors(v.ids, 0.5, 3)
    ref = search_numpy(v.take(np.searchsorted(v.ids, anchors)), v, lo, hi, 2)
    assert t["anchor_id"] == ref.anchor_id.tolist()
    assert t["positive_id"] == ref.positive_id.tolist()
    np.testing.assert_allclose(t["similarity"], ref.similarity, atol=1e-3)
    assert all(a != p for a, p in zip(t["anchor_id"], t["positive_id"], strict=True))
    assert all(lo <= s <= hi for s in t["similarity"])
    assert max(np.bincount(np.unique(t["anchor_id"], return_inverse=True)[1])) <= 2
    assert m["k"] == len(anchors) and m["n"] == len(v)
    assert 0.0 <= m["precision"]["overall"] <= 1.0 and m["precision"]["per_class"]
    assert sum(m["similarity_histogram"]["pairs"]) == m["num_pairs"]
    assert m["workers"][0]["node"]


def test_defaults_take_5_percent_anchors_and_every_in_window_image(
    embeddings: str, tmp_path: Path
) -> None:
    """The paper's rule (arXiv 2306.16122): K = 5% seeded anchors, every image in [lo, hi]."""
    lo, hi = _band(embeddings)
    m = _mine(embeddings, str(tmp_path / "p"), lo=lo, hi=hi)
    v, _ = load_embeddings(embeddings)
    from sepp_ray.mining.anchors import choose_anchors

    anchors = choose_anchors(v.ids, 0.05, 0)
    assert m["k"] == len(anchors) == round(0.05 * len(v)) == 10
    assert m["anchor_fraction"] == round(10 / len(v), 6)
    assert m["m"] is None and m["config"]["k"] == 0.05
    ref = search_numpy(v.take(np.searchsorted(v.ids, anchors)), v, lo, hi, None)
    t = read_pairs(str(tmp_path / "p")).to_pydict()
    assert t["anchor_id"] == ref.anchor_id.tolist()
    assert t["positive_id"] == ref.positive_id.tolist()
    per_anchor = np.bincount(np.unique(ref.anchor_id, return_inverse=True)[1])
    assert per_anchor.max() >= 3  # well past the old cap of one positive per anchor
    assert m["positives_per_anchor"]["max"] == per_anchor.max()
    assert m["num_pairs"] == len(ref) and sum(m["similarity_histogram"]["pairs"]) == len(ref)
    at_lo = next(r for r in m["threshold_curve"] if r["lo"] == round(lo, 4))
    assert at_lo["pairs"] <= len(ref)  # rows at or above lo count mined pairs only


def test_too_many_pairs_is_an_error(embeddings: str, tmp_path: Path) -> None:
    with pytest.raises(SeppError, match="more than 100 pairs.*max_pairs"):
        _mine(embeddings, str(tmp_path / "big"), lo=-1.0, hi=0.9999, k=20, max_pairs=100)
    assert not (tmp_path / "big" / "manifest.json").exists()


def test_a_missing_split_is_an_error(images: str, embeddings: str, tmp_path: Path) -> None:
    cfg = MineConfig(lo=-1.0, hi=0.9999, k=5, m=1)
    for src, splits, msg in [
        (images, ["unlabeled"], r"\['unlabeled'\] are not in .*which has \[.*'train'.*\]"),
        (embeddings, ["test"], r"\['test'\] are not in the embeddings.*\['train'\]"),
        (embeddings, ["train", "test"], "not in the embeddings"),
    ]:
        with pytest.raises(SeppError, match=msg):
            mine_command(
                src,
                str(tmp_path / "o"),
                ENC,
                cfg,
                splits=splits,
                actors=None,
                overwrite=False,
                config={},
            )
        assert not (tmp_path / "o").exists()


def test_embeddings_of_other_splits_are_an_error(tmp_path: Path) -> None:
    both = str(tmp_path / "both")
    _fake_embeddings(both, np.eye(4, dtype=np.float32)[np.arange(20) % 4], ["train", "test"])
    with pytest.raises(SeppError, match=r"also hold split\(s\) \['test'\]"):
        _mine(both, str(tmp_path / "o"), k=5)


def test_sharded_keys_equal_replicated(embeddings: str, tmp_path: Path) -> None:
    lo, hi = _band(embeddings)
    _mine(embeddings, str(tmp_path / "rep"), lo=lo, hi=hi, k=0.5, actors=2)
    ms = _mine(embeddings, str(tmp_path / "sh"), lo=lo, hi=hi, k=0.5, shard_keys=3)
    assert len(ms["workers"]) == 3 and {w["keys"] for w in ms["workers"]} != {ms["n"]}
    assert read_pairs(str(tmp_path / "rep")).equals(read_pairs(str(tmp_path / "sh")))


def test_mine_from_images_reuses_embeddings_and_writes_to_s3(images: str, bucket: str) -> None:
    out = f"{bucket}/pairs/run1"
    m1 = _mine(images, out, lo=-1.0, hi=0.999, k=20, m=1)
    assert m1["num_pairs"] == 20 and read_manifest(f"{out}/embeddings")["kind"] == "embeddings"
    emb_before = read_manifest(f"{out}/embeddings")["created_unix"]
    # a second run into a fresh manifest-less state (as after a crash) reuses the embeddings
    from sepp_ray.storage import Location

    Location(out).fs.rm(Location(out).join("manifest.json"))
    Location(out).write_bytes("_SEPP_WRITING", b"{}")
    m2 = _mine(images, out, lo=-1.0, hi=0.999, k=20, m=1)
    assert read_manifest(f"{out}/embeddings")["created_unix"] == emb_before
    assert m2["num_pairs"] == 20


def test_zero_pairs_is_a_warning_recorded_in_the_manifest(embeddings: str, tmp_path: Path) -> None:
    m = _mine(embeddings, str(tmp_path / "z"), lo=0.9999, hi=0.99995, k=10)
    assert m["num_pairs"] == 0
    assert "Relax the lower threshold" in m["warning"]
    assert read_manifest(str(tmp_path / "z"))["warning"] == m["warning"]


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"lo": 0.99, "hi": 0.96}, "lo"),
        ({"lo": -1.5, "hi": 0.9}, "[-1, 1]"),
        ({"k": 10_000}, "K"),
        ({"k": 0}, "K"),
        ({"m": 0}, "m=0"),
    ],
)
def test_bad_mining_parameters(embeddings: str, tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(SeppError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _mine(embeddings, str(tmp_path / "bad"), **kw)
    assert not (tmp_path / "bad" / "manifest.json").exists()


def _fake_embeddings(uri: str, vecs: np.ndarray, splits: list[str] | None = None) -> None:
    loc = begin_write(uri)
    dim = vecs.shape[1] if vecs.ndim == 2 else 4
    t = pa.table(
        {
            "id": np.arange(len(vecs), dtype=np.int64),
            "label": pa.array([0] * len(vecs), pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vecs.reshape(-1).astype(np.float32)), dim
            ),
        }
    )
    loc.fs.makedirs(loc.join("embeddings"), exist_ok=True)
    pq.write_table(t, loc.join("embeddings/a.parquet"))
    finish_write(
        loc,
        {
            "kind": "embeddings",
            "num_embeddings": len(vecs),
            "dim": dim,
            "encoder": {"identity": "fake"},
            "dataset": {"uri": "x", "classes": []},
            "files": [{"path": "embeddings/a.parquet", "rows": len(vecs)}],
            "splits": splits or ["train"],
        },
    )


def test_nan_and_empty_embeddings_are_errors(tmp_path: Path) -> None:
    v = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[3, 1] = np.nan
    _fake_embeddings(str(tmp_path / "nan"), v)
    with pytest.raises(SeppError, match="NaN"):
        _mine(str(tmp_path / "nan"), str(tmp_path / "o1"), k=5)
    _fake_embeddings(str(tmp_path / "empty"), np.zeros((0, 4), np.float32))
    with pytest.raises(SeppError, match="no embeddings|empty"):
        _mine(str(tmp_path / "empty"), str(tmp_path / "o2"))


def test_checkpoint_of_another_architecture_is_a_clear_error(images: str, tmp_path: Path) -> None:
    from sepp_ray.models.backbones import create_backbone

    model, _ = create_backbone("resnet18", cifar_stem=True)
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    bad = EncoderConfig(name="resnet34", cifar_stem=True, checkpoint=str(tmp_path / "r18.pt"))
    with pytest.raises(SeppError, match="do not fit architecture resnet34"):
        embed(images, str(tmp_path / "e"), bad)
    assert not (tmp_path / "e").exists()
    good = EncoderConfig(
        name="resnet18", cifar_stem=True, image_size=16, checkpoint=str(tmp_path / "r18.pt")
    )
    m = embed(images, str(tmp_path / "e2"), good, splits=["test"])
    assert m["encoder"]["identity"].startswith("state-dict:resnet18")


def test_pairs_report_writes_pictures(embeddings: str, tmp_path: Path) -> None:
    lo, hi = _band(embeddings)
    _mine(embeddings, str(tmp_path / "p"), lo=lo, hi=hi, m=3)
    files = write_report(str(tmp_path / "p"), str(tmp_path / "rep"))
    names = {Path(f).name for f in files}
    assert names == {
        "pairs_grid.png",
        "similarity_histogram.png",
        "precision_vs_threshold.png",
        "report.md",
    }
    from PIL import Image

    with Image.open(tmp_path / "rep" / "pairs_grid.png") as im:
        assert im.size[0] > 64 * 3
    assert "pair precision" in (tmp_path / "rep" / "report.md").read_text()


def test_killed_mining_is_not_readable_and_a_rerun_completes(
    images: str, tmp_path: Path, ray_cluster: str
) -> None:
    out = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "sepp_ray.cli",
        "mine",
        images,
        str(out),
        "encoder.name=resnet18",
        "encoder.cifar_stem=true",
        "encoder.image_size=16",
        "encoder.batch_size=8",
        "mining.lo=-1",
        "mining.k=30",
        "mining.m=1",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "embeddings").exists():
        time.sleep(0.1)
    assert (out / "embeddings").exists(), "mining never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(IncompleteError):
        read_pairs(str(out))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["num_pairs"] == 30


def test_embeddings_reader_sorts_filters_and_reads_only_listed_files(tmp_path: Path) -> None:
    uri = str(tmp_path / "e")
    loc = begin_write(uri)
    loc.fs.makedirs(loc.join("embeddings"), exist_ok=True)
    files = {"b": [5, 1, 3], "a": [4, 0, 2], "stray": [99]}
    for name, ids in files.items():
        labels = pa.array([None if i == 3 else i % 2 for i in ids], pa.int64())
        vecs = np.array([[i, -i] for i in ids], np.float32).reshape(-1)
        t = pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "label": labels,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs), 2),
            }
        )
        pq.write_table(t, loc.join(f"embeddings/{name}.parquet"))
    listed = [{"path": f"embeddings/{n}.parquet", "rows": 3} for n in ("b", "a")]
    finish_write(loc, {"kind": "embeddings", "num_embeddings": 6, "dim": 2, "files": listed})
    v, labels = load_embeddings(uri)
    assert v.ids.tolist() == [0, 1, 2, 3, 4, 5]  # sorted; the stray file is not read
    assert v.numpy()[:, 1].tolist() == [0, -1, -2, -3, -4, -5]
    assert labels.tolist() == [0, 1, 0, -1, 0, 1]
    assert embedding_ids(uri).tolist() == [0, 1, 2, 3, 4, 5]
    assert embedding_labels(uri) == {0: 0, 1: 1, 2: 0, 3: -1, 4: 0, 5: 1}
    v, labels = load_embeddings(uri, files=[0], ids=np.array([4, 5, 1]))
    assert v.ids.tolist() == [1, 5] and labels.tolist() == [1, 1]
    v, labels = load_embeddings(uri, files=[])
    assert v.numpy().shape == (0, 2) and labels.shape == (0,)
    assert read_embeddings(uri, ["id", "label"]).column_names == ["id", "label"]
    finish_write(begin_write(str(tmp_path / "p")), {"kind": "pairs", "files": {}})
    with pytest.raises(SeppError, match="not embeddings"):
        read_embeddings(str(tmp_path / "p"), ["id"])
    with pytest.raises(SeppError, match="not mined pairs"):
        read_pairs(uri)


def test_unlabeled_embeddings_have_no_labels(tmp_path: Path) -> None:
    uri = str(tmp_path / "u")
    loc = begin_write(uri)
    loc.fs.makedirs(loc.join("embeddings"), exist_ok=True)
    t = pa.table(
        {
            "id": pa.array([0, 1], pa.int64()),
            "label": pa.array([None, None], pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array([1.0, 0, 0, 1], pa.float32()), 2
            ),
        }
    )
    pq.write_table(t, loc.join("embeddings/a.parquet"))
    files = [{"path": "embeddings/a.parquet", "rows": 2}]
    finish_write(loc, {"kind": "embeddings", "num_embeddings": 2, "dim": 2, "files": files})
    assert embedding_labels(uri) is None


def _fail(message: str) -> None:
    raise SeppError(message)


class _Worker:
    def ping(self) -> int:
        return 1

    def die(self) -> None:  # the process ends as an out-of-memory kill would end it
        os._exit(1)


def test_ray_get_surfaces_project_errors_and_names_a_lost_actor() -> None:
    import ray

    from sepp_ray.ray_utils import ray_get

    with pytest.raises(SeppError, match="^the fix is to do X$"):
        ray_get(ray.remote(_fail).options(num_cpus=0).remote("the fix is to do X"))
    with pytest.raises(ray.exceptions.RayTaskError):  # other errors stay Ray's
        ray_get(ray.remote(lambda: 1 / 0).options(num_cpus=0).remote())
    actor = ray.remote(_Worker).options(num_cpus=0).remote()
    assert ray_get(actor.ping.remote()) == 1
    with pytest.raises(SeppError, match="(?s)^a search actor died: .*Give it more memory$"):
        ray_get(actor.die.remote(), lost=("a search actor", "Give it more memory"))


def test_search_actors_take_their_former_name_workers() -> None:
    # `workers` is pretraining's word (Ray Train workers); mining's is `actors`, as in embed
    assert MineConfig(actors=3).search_actors == 3
    assert MineConfig(workers=2).search_actors == 2  # an older config still runs as written
    MineConfig(workers=2, actors=2).validate()
    with pytest.raises(SeppError, match="disagree: set actors only"):
        MineConfig(workers=2, actors=3).validate()
    with pytest.raises(SeppError, match="actors=0 must be >= 1"):
        MineConfig(actors=0).validate()
