"""The `sepp` command: help, config precedence, clear errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sepp_ray.cli import main, parse_config
from sepp_ray.data.dataset import ImageDataset

REPO = Path(__file__).resolve().parents[1]


def sepp(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sepp_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_help_lists_commands_and_every_key() -> None:
    top = sepp("--help")
    assert top.returncode == 0 and "ingest" in top.stdout and "inspect" in top.stdout
    sub = sepp("ingest", "--help")
    assert sub.returncode == 0
    for key in ("images.resize", "source_options.chunk_size", "overwrite", "format"):
        assert key in sub.stdout
    assert "resize so the shorter side" in sub.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["ingest", "/no/such/dir", "/tmp/x"], "does not exist"),
        (["ingest", "digits", "/tmp/x", "--format", "bmp-pile"], "unknown format 'bmp-pile'"),
        (["ingest", "digits", "/tmp/x", "images.rezise=3"], "unknown config key(s) images.rezise"),
        (["ingest", "digits", "/tmp/x", "images.resize=big"], "cannot read 'big' as int"),
        (["ingest", "digits", "/tmp/x", "images.encoding=gif"], "encoding must be one of"),
        (["ingest"], "ingest needs SOURCE and OUT"),
        (["inspect", "/no/such/dataset"], "is not a complete sepp-ray output"),
        (["ingest", "digits", "s3://"], "names no bucket"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path
) -> None:
    r = sepp(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not Path("/tmp/x/manifest.json").exists()


def test_positionals_yaml_and_overrides_merge(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    # the file names a source too: what is typed on the command line wins
    conf.write_text("source: digits\nformat: synthetic\nsource_options:\n  n: 5\n  size: 12\n")
    _, c = parse_config(
        [
            "ingest",
            "synthetic",
            str(tmp_path / "o"),
            "--config",
            str(conf),
            "source_options.n=9",
            "--overwrite",
        ]
    )
    assert (c.source, c.out, c.format) == ("synthetic", str(tmp_path / "o"), "synthetic")
    assert (c.source_options.n, c.source_options.size, c.overwrite) == (9, 12, True)


@pytest.mark.usefixtures("ray_cluster")
def test_ingest_then_inspect_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    assert main(["ingest", "synthetic", str(out), "source_options.n=40"]) == 0
    assert "ingested 40 images" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    assert main(["inspect", str(out), f"grid={grid}"]) == 0
    text = capsys.readouterr().out
    assert "images     40" in text and f"sample grid: {grid}" in text
    from PIL import Image

    with Image.open(grid) as img:
        assert img.size[0] > 64 * 8 and img.size[1] >= 64
    assert ImageDataset.open(str(out)).manifest["config"]["source_options"]["n"] == 40


@pytest.mark.usefixtures("ray_cluster")
def test_inspect_shows_splits_side_by_side_and_flags_anomalies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.imagetree import write_tree

    write_tree(tmp_path / "tree", classes=("cat", "dog"), per_class=2, splits=("train",))
    write_tree(tmp_path / "tree", classes=("cat", "owl"), per_class=2, splits=("test",))
    out = tmp_path / "ds"
    args = ["ingest", str(tmp_path / "tree"), str(out), "images.val_fraction=0"]
    assert main(args) == 2  # a class in the test split only: refused, with the fix
    err = capsys.readouterr().err
    assert "split 'test' has 1 classes that train lacks (owl)" in err
    assert "layout_check=warn" in err
    assert main([*args, "source_options.layout_check=warn"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    table = text[text.index("per class") :].splitlines()
    assert table[1].split() == ["class", "test", "train"]
    assert table[2].split() == ["cat", "2", "2"]
    assert table[3].split() == ["dog", "-", "2"] and table[4].split() == ["owl", "2", "-"]
    assert "WARNING    split 'test' has 1 classes that train lacks (owl)" in text
    assert f"sample grid: {out}/inspect/samples.png" in text
    assert (out / "inspect" / "samples.png").stat().st_size > 0
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("mining.k=-1", "k=-1.0 (K, the anchors) must be a fraction of the images in (0, 1]"),
        ("mining.k=2.5", "or a whole count > 1"),
        ("mining.m=0", "m=0 must be >= 1"),
        ("mining.backend=nope", "unknown search backend 'nope': choose auto or one of"),
    ],
)
def test_mine_refuses_bad_settings_before_reading_anything(
    override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The input does not even exist: the settings are refused before it is read or embedded."""
    out = tmp_path / "pairs"
    assert main(["mine", str(tmp_path / "no-such-dataset"), str(out), override]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "setting,message",
    [
        ("backbone=resnet181", "unknown backbone 'resnet181': did you mean one of"),
        ("recipe=simclr2", "unknown augmentation recipe 'simclr2'"),
        ("amp=fp8", "amp must be one of ['auto', 'bf16', 'off'], got 'fp8'"),
        ("backbone=test_convnext cifar_stem=true", "cifar_stem is unsupported for backbone"),
    ],
)
def test_pretrain_settings_fail_before_any_data_or_ray(
    setting: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before the dataset is opened (it does not exist here) and before Ray starts:
    one line, exit 2, nothing written at OUT."""
    out = tmp_path / "run"
    assert main(["pretrain", str(tmp_path / "no-dataset"), str(out), *setting.split()]) == 2
    # one line (in-process, the copy meant for the Ray log file is captured here too)
    err = set(capsys.readouterr().err.strip().splitlines())
    assert len(err) == 1 and message in err.pop(), err
    assert not out.exists()


def test_pretrain_bad_backbone_exits_2_in_one_line_without_traceback(tmp_path: Path) -> None:
    r = sepp("pretrain", str(tmp_path / "no-dataset"), str(tmp_path / "run"), "backbone=nope")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "unknown backbone 'nope'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_pretrain_settings_are_checked_without_locations() -> None:
    """What a flow validates before its dataset and output exist."""
    from sepp_ray.errors import SeppError
    from sepp_ray.train.config import PretrainConfig

    PretrainConfig(backbone="test_resnet", recipe="byol").validate_settings()  # no locations
    with pytest.raises(SeppError, match="pretrain needs DATASET and OUT"):
        PretrainConfig().validate()
    bad = [
        ({"backbone": "nope"}, "unknown backbone 'nope'"),
        ({"recipe": "sparkly"}, "unknown augmentation recipe 'sparkly'"),
        ({"amp": "fp16"}, "amp must be one of"),
        ({"optimizer": "adam"}, "optimizer must be one of"),
        ({"lr_scaling": "cubic"}, "lr_scaling must be one of"),
        ({"method": "mocov9"}, "unknown method 'mocov9'"),
        ({"hparams": {"temprature": 0.1}}, r"unknown hyperparameter\(s\) \['temprature'\]"),
        ({"decode_on": "tpu"}, "decode_on must be cpu or gpu"),
        ({"read_ahead": -1}, "read_ahead must be >= 0"),
        ({"knn_k": 0}, "knn_k must be >= 1"),
        ({"budget_steps": 0}, "budget_steps must be >= 1 or none"),
        ({"preflight_limit_gb": 0.0}, "preflight_limit_gb must be > 0"),
        ({"gpu_wait_s": -1.0}, "gpu_wait_s must be >= 0"),
    ]
    for kw, message in bad:
        with pytest.raises(SeppError, match=message):
            PretrainConfig(**kw).validate_settings()  # type: ignore[arg-type]


def test_a_file_that_is_not_a_checkpoint_is_named_with_what_a_checkpoint_is(
    tmp_path: Path,
) -> None:
    import torch

    from sepp_ray.errors import SeppError
    from sepp_ray.models.backbones import create_backbone
    from sepp_ray.models.checkpoint import (
        BACKBONE_FILE,
        BackboneMeta,
        load_backbone,
        load_state_file,
        save_backbone,
    )
    from sepp_ray.train.state import STATE_FILE, load_training_state

    text = tmp_path / "notes.pt"
    text.write_text("not weights\n")
    with pytest.raises(SeppError) as err:
        load_state_file(str(text))
    assert str(text) in str(err.value) and "a checkpoint is a location written by" in str(err.value)
    assert "torch cannot read it" in str(err.value) and "load key" not in str(err.value)

    pickled = tmp_path / "model.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a module, not a state dict
    with pytest.raises(SeppError, match="holds Python objects besides tensors"):
        load_state_file(str(pickled))

    with pytest.raises(SeppError, match=f"{text} is not a checkpoint"):
        load_backbone(str(text))

    ckpt = tmp_path / "ckpt"
    model, dim = create_backbone("test_resnet", cifar_stem=True)
    save_backbone(
        str(ckpt), model, BackboneMeta("test_resnet", True, dim, 16), files={STATE_FILE: b"x"}
    )
    (ckpt / BACKBONE_FILE).write_bytes(b"damaged")
    with pytest.raises(SeppError, match=f"{ckpt} is not a checkpoint"):
        load_backbone(str(ckpt))
    with pytest.raises(SeppError, match=f"{STATE_FILE} is not a training state") as err:
        load_training_state(str(ckpt))
    assert "overwrite=true" in str(err.value)


def test_mine_refuses_more_anchors_than_images_before_embedding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The image count is in the dataset's manifest: a count K above it fails before the
    encoder is loaded or anything is embedded."""
    data = tmp_path / "data"
    data.mkdir()
    manifest = {"kind": "images", "splits": {"train": {"total": 40}, "test": {"total": 10}}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "pairs"
    assert main(["mine", str(data), str(out), "mining.k=41", "encoder.checkpoint=/nowhere"]) == 2
    assert "mining.k=41 anchors exceeds the 40 images of split(s) ['train']" in (
        capsys.readouterr().err
    )
    assert not out.exists()
