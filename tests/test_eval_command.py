"""`run_eval` on Ray: two checkpoints compared in one table, cached features, bad inputs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sepp_ray.data.dataset import ImageDataset, dataset_fingerprint
from sepp_ray.errors import SeppError
from sepp_ray.eval.command import EvalConfig, read_metrics, run_eval
from sepp_ray.eval.detection import DetectionConfig
from sepp_ray.eval.features import extract_features_local, load_features
from sepp_ray.eval.linear import LinearProbeConfig
from sepp_ray.eval.semisup import FinetuneConfig
from sepp_ray.eval.voc import write_toy_voc
from sepp_ray.models.backbones import create_backbone
from sepp_ray.models.checkpoint import BackboneMeta, save_backbone
from sepp_ray.models.knn import knn_classify
from sepp_ray.storage import read_manifest


@pytest.fixture(scope="module")
def setup(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import SourceOptions, open_source

    root = tmp_path_factory.mktemp("evalcmd")
    data = str(root / "data")
    ingest(open_source("synthetic", options=SourceOptions(n=100, size=16)), data)
    paths = {"root": str(root), "data": data}
    for name, seed, pre in (("ckpt-a", 0, data), ("ckpt-b", 1, "s3://elsewhere/stl10")):
        torch.manual_seed(seed)
        model, dim = create_backbone("test_resnet", cifar_stem=True)
        paths[name] = str(root / "runs" / name)
        save_backbone(
            paths[name],
            model,
            BackboneMeta("test_resnet", True, dim, 16),
            extra={"dataset": {"uri": pre}},
        )
    voc = root / "voc"
    write_toy_voc(voc, n_train=4, n_val=2, size=32, seed=1)
    paths["voc"] = str(voc)
    return paths


def small(setup: dict[str, str], out: str, **kw: Any) -> EvalConfig:
    cfg = EvalConfig(
        checkpoints=[setup["ckpt-a"], setup["ckpt-b"]],
        dataset=setup["data"],
        protocols=["knn", "linear"],
        k=10,
        out=out,
        linear=LinearProbeConfig(epochs=5, lrs=[0.01, 0.1]),
        semisup=FinetuneConfig(epochs=1, batch_size=16),
        detection=DetectionConfig(
            iters=2,
            batch_size=2,
            min_size=32,
            max_size=32,
            anchor_sizes=[4, 8, 16, 32, 64],
            box_rois=16,
            proposals=50,
        ),
    )
    return replace(cfg, **kw)


def test_two_checkpoints_every_protocol(setup: dict[str, str]) -> None:
    out = str(Path(setup["root"]) / "eval")
    cfg = small(
        setup,
        out,
        protocols=["knn", "linear", "semisup", "detection"],
        label_fractions=[0.5],
        voc_root=setup["voc"],
    )
    metrics = run_eval(cfg)
    assert read_manifest(out)["kind"] == "eval"
    assert read_metrics(out) == json.loads(json.dumps(metrics))
    a, b = metrics["checkpoints"]
    assert (a["name"], b["name"]) == ("ckpt-a", "ckpt-b")
    assert a["sha256"] != b["sha256"]
    # transfer: both datasets are recorded, and told apart
    assert a["pretrain_dataset"] == setup["data"] and a["transfer"] is False
    assert b["pretrain_dataset"] == "s3://elsewhere/stl10" and b["transfer"] is True
    assert metrics["dataset"]["uri"] == setup["data"]
    for e in (a, b):
        assert set(e) >= {"knn", "linear", "semisup", "detection"}
        assert 0.0 <= e["linear"]["top1"] <= 1.0 and e["linear"]["best_lr"] in (0.01, 0.1)
        assert 0.0 <= e["semisup"]["0.5"]["top1"] <= 1.0
        assert all(0.0 <= e["detection"][k] <= 1.0 for k in ("AP", "AP50", "AP75"))
    # the kNN figure equals kNN on features extracted in-process (no Ray, no cache)
    for e, name in ((a, "ckpt-a"), (b, "ckpt-b")):
        tr = extract_features_local(setup[name], setup["data"], "train").labeled()
        te = extract_features_local(setup[name], setup["data"], "test").labeled()
        t = [torch.from_numpy(v) for v in (tr.feats, tr.labels, te.feats, te.labels)]
        ref = knn_classify(t[0], t[1], t[2], t[3], 10, k=10)
        assert e["knn"]["top1"] == pytest.approx(ref["top1"])
        cached = load_features(f"{out}/features/{e['sha256'][:16]}", "train")
        np.testing.assert_array_equal(cached.ids, tr.ids)
        np.testing.assert_allclose(cached.feats, tr.feats, rtol=1e-4, atol=1e-5)
    table = (Path(out) / "metrics.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| checkpoint"))
    for col in ("kNN top-1", "linear top-5", "semi 50% top-1", "det AP50", "det AP", "det AP75"):
        assert f"| {col} |" in header
    rows = [line for line in table if line.startswith("| ckpt-")]
    assert len(rows) == 2
    assert rows[0].startswith(f"| ckpt-a | test_resnet | {setup['data']} | ")
    assert f"{100 * a['knn']['top1']:.2f}" in rows[0]
    assert f"{100 * b['linear']['top1']:.2f}" in rows[1]


def test_rerun_reuses_cached_features(setup: dict[str, str]) -> None:
    out = str(Path(setup["root"]) / "eval-cache")
    run_eval(small(setup, out, protocols=["knn"], checkpoints=[setup["ckpt-a"]]))
    feat_dir = next((Path(out) / "features").iterdir())
    stamp = read_manifest(str(feat_dir))["created_unix"]
    with pytest.raises(SeppError, match="already holds a complete result"):
        run_eval(small(setup, out, protocols=["knn"], checkpoints=[setup["ckpt-a"]]))
    again = run_eval(
        small(setup, out, protocols=["knn"], checkpoints=[setup["ckpt-a"]], overwrite=True)
    )
    assert read_manifest(str(feat_dir))["created_unix"] == stamp
    assert (
        again["checkpoints"][0]["knn"]["top1"] == read_metrics(out)["checkpoints"][0]["knn"]["top1"]
    )


def test_bad_inputs_fail_before_any_output(setup: dict[str, str], tmp_path: Path) -> None:
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import open_source
    from tests.formats import write_stl10

    out = str(tmp_path / "never")
    empty = tmp_path / "empty"
    empty.mkdir()
    mismatch = str(tmp_path / "mismatch")
    model, dim = create_backbone("test_resnet", cifar_stem=True)
    save_backbone(mismatch, model, BackboneMeta("resnet18", True, dim, 16))
    write_stl10(tmp_path / "stl", n_train=3, n_test=2, n_unlabeled=2)
    stl = str(tmp_path / "stl-data")
    ingest(open_source(str(tmp_path / "stl")), stl)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"checkpoints": [setup["data"]]}, "is a 'images' output, not a checkpoint"),
        ({"checkpoints": [str(empty)]}, "is not a checkpoint"),
        ({"checkpoints": [mismatch]}, "do not fit architecture resnet18"),
        ({"test_split": "holdout"}, "split 'holdout' is not in"),
        ({"dataset": stl, "train_split": "unlabeled"}, "split 'unlabeled' .* has no labels"),
        ({"protocols": ["semisup"], "label_fractions": [0.001]}, "leaves class .* empty"),
        ({"protocols": ["knn", "segmentation"]}, "unknown protocol"),
        ({"protocols": ["detection"]}, "needs a VOC dataset"),
        ({"protocols": ["detection"], "voc_root": str(empty)}, "not a VOC dataset"),
        ({"checkpoints": []}, "at least one checkpoint"),
    ]
    for kw, msg in cases:
        with pytest.raises(SeppError, match=msg):
            run_eval(small(setup, out, **kw))
        assert not Path(out).exists()


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"protocols": ["knn", "nope"]}, "unknown protocol"),
        ({"protocols": []}, "none given"),
        ({"k": 0}, r"k \(kNN neighbours\)"),
        ({"temperature": 0.0}, "temperature"),
        ({"batch_size": 0}, "batch_size"),
        ({"protocols": ["semisup"], "label_fractions": []}, "needs label_fractions"),
        ({"protocols": ["semisup"], "label_fractions": [0.1, 1.5]}, r"\(0, 1\]"),
        ({"linear": LinearProbeConfig(epochs=0)}, "linear probe epochs"),
    ],
)
def test_settings_are_checked_without_locations(kw: dict[str, Any], message: str) -> None:
    EvalConfig(protocols=["knn", "linear", "semisup"]).validate_settings()  # no URI given
    with pytest.raises(SeppError, match=message):
        EvalConfig(**kw).validate_settings()
    with pytest.raises(SeppError, match=message):  # and `sepp eval` checks them as well
        EvalConfig(checkpoints=["c"], dataset="d", out="o", **kw).validate()


def test_locations_are_checked_by_validate_only() -> None:
    with pytest.raises(SeppError, match="checkpoint URI"):
        EvalConfig(dataset="d", out="o").validate()
    with pytest.raises(SeppError, match="dataset URI"):
        EvalConfig(checkpoints=["c"], out="o").validate()
    with pytest.raises(SeppError, match="voc_root"):
        EvalConfig(checkpoints=["c"], out="o", protocols=["detection"]).validate()
    EvalConfig(protocols=["detection"]).validate_settings()


def test_dataset_identity_is_its_manifest_content() -> None:
    manifest = {
        "format_version": 1,
        "created_unix": 1.5,
        "kind": "images",
        "num_images": 3,
        "source": {"kind": "synthetic", "fingerprint": "abc"},
        "options": {"resize": 32},
        "files": [{"path": "shard-0.parquet", "rows": 3}],
        "config": {"argv": ["sepp", "ingest"]},
    }
    fp = ImageDataset("x", manifest).fingerprint
    # the features cache keys on this value: it must not change between versions
    body = {k: v for k, v in manifest.items() if k not in ("created_unix", "config")}
    assert fp == hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    assert dataset_fingerprint({**manifest, "created_unix": 9.0, "config": {}}) == fp
    # the same source ingested at other settings is another dataset
    assert dataset_fingerprint({**manifest, "options": {"resize": 64}}) != fp
