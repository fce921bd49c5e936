"""The `sepp` command: help, config precedence, clear errors and exit codes."""

from __future__ import annotations

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
