"""`--dry-run` of `sepp pipeline` and `sepp pretrain`: every recipe in jobs/ prints its plan
(every stage, its resources, wall time and GPU-hours) without starting Ray or reading remote
data; the estimates follow the config as they must (twice the epochs, twice the training time;
fewer, slower GPUs, longer); the data is sized without reading it.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from sepp_ray.cli import main, parse_config
from sepp_ray.errors import SeppError
from sepp_ray.flow import datasizes as ds
from sepp_ray.flow import throughput as tp
from sepp_ray.flow.dryrun import (
    duration,
    format_plan,
    parse_hardware,
    plan_pipeline,
    plan_pretrain,
)
from sepp_ray.flow.pipeline import MINED, PipelineConfig

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
PIPELINES = sorted(p.name for p in JOBS.glob("pipeline-*.yaml"))
COLUMNS = ("stage", "res", "work", "wall", "gpuh", "figs")


def rows_of(text: str) -> dict[str, dict[str, str]]:
    """The plan table's rows by stage (the header and its rule excluded)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == len(COLUMNS) and cells[0] != "stage":
            rows[cells[0]] = dict(zip(COLUMNS, cells, strict=True))
    return rows


def expected_stages(c: PipelineConfig) -> set[str]:
    """The stages `sepp pipeline` runs with ``c``, as named in the plan."""
    p = c.pretrain
    names = {f"{arm}-seed{p.seed + i}" for i in range(c.seeds) for arm in c.arms}
    if any(a in MINED for a in c.arms):
        names.add(f"pairs-seed{p.seed}")
        if c.bootstrap_epochs == p.epochs:
            names = names - {f"plain-seed{p.seed}"} | {f"plain-seed{p.seed} (= bootstrap)"}
        else:
            names.add(f"bootstrap-seed{p.seed}")
    return names | {"eval", "total"}


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_recipe_dry_runs_with_every_stage(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each recipe, given remote locations that do not exist, prints every stage with its
    resources and estimates, creates nothing and starts no Ray (the suite may have a cluster
    up already: any call to start or join one fails the test)."""
    import ray

    def no_ray(*_: object, **__: object) -> None:
        raise AssertionError("the dry run started or joined Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    work = tmp_path / "work"
    argv = ["pipeline", "s3://bkt/raw", "--config", str(JOBS / name), f"work={work}"]
    if name == "pipeline-digits.yaml":  # the built-in source, whatever SOURCE says
        argv[1] = "digits"
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    _, config = parse_config(argv)
    rows = rows_of(out)
    stages = expected_stages(config) | ({"data (ingest)"})
    assert set(rows) == stages, out
    for stage, row in rows.items():
        if stage == "total":
            continue
        assert row["res"] and row["work"], row
        assert re.fullmatch(r"\d+(\.\d)? (s|min|h|d)", row["wall"]), row
        assert float(row["gpuh"].replace(",", "")) >= 0
    total = float(rows["total"]["gpuh"].replace(",", ""))
    assert total == pytest.approx(
        sum(float(r["gpuh"].replace(",", "")) for s, r in rows.items() if s != "total"),
        abs=0.05 * len(rows),  # each row rounded to 0.1
    )
    assert "figures:" in out and "measured" in out
    assert not work.exists()


def test_pretrain_recipe_dry_runs_with_a_named_data_size(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["pretrain", "s3://bkt/d", "s3://bkt/o", "--config", str(JOBS / "pretrain-cifar10.yaml")]
    assert main([*argv, "--dry-run", "--data-size", "cifar10", "--hardware", "a100x8"]) == 0
    out = capsys.readouterr().out
    rows = rows_of(out)
    assert set(rows) == {"pretrain", "total"}
    assert "8 GPU workers" in rows["pretrain"]["res"]
    assert "800 epochs of 47,500" in rows["pretrain"]["work"]  # the val carve, as ingested
    assert "A100 speed: 0.5 x H100 (estimate" in out


def test_remote_data_of_unknown_size_is_refused_with_the_fix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["pretrain", "s3://bkt/d", "s3://bkt/o", "--config", str(JOBS / "pretrain-cifar10.yaml")]
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "s3://bkt/d" in err and "--data-size" in err


def test_plan_options_without_dry_run_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "s3://bkt/d", "s3://bkt/o", "--hardware", "h100x8"]) == 2
    assert "add --dry-run" in capsys.readouterr().err


def test_a_bad_config_fails_the_dry_run_as_it_fails_the_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The dry run validates first: a typo costs no plan."""
    argv = ["pipeline", "digits", "--config", str(JOBS / "pipeline-digits.yaml"), "arms=[plain,xx]"]
    assert main([*argv, "--dry-run"]) == 2
    assert "unknown arm" in capsys.readouterr().err


# ---- the estimates ---------------------------------------------------------------------------


def digits_config(**pretrain: object) -> PipelineConfig:
    _, c = parse_config(["pipeline", "digits", "--config", str(JOBS / "pipeline-digits.yaml")])
    return replace(c, pretrain=replace(c.pretrain, **pretrain))


def train_seconds(plan_rows: list, stage: str) -> float:
    (row,) = [r for r in plan_rows if r.stage == stage]
    return float(row.wall_s - tp.START_UP.value)


def stl10_config() -> PipelineConfig:
    """STL-10's unlabeled split at 96 px, ResNet-50 on 8 GPUs, 100 epochs, no monitor."""
    return digits_config(
        split="unlabeled",
        backbone="resnet50",
        cifar_stem=False,
        image_size=96,
        workers=8,
        batch_size=1024,
        epochs=100,
        knn_monitor=False,
    )


def test_twice_the_epochs_is_twice_the_training_time() -> None:
    data = ds.KNOWN["stl10"]
    hw = parse_hardware("h100x8", 8)
    base = stl10_config()
    longer = replace(base, pretrain=replace(base.pretrain, epochs=200))
    a, b = plan_pipeline(base, data, hw), plan_pipeline(longer, data, hw)
    for stage in ("ap-seed0", "sp-seed1"):
        assert train_seconds(b.rows, stage) == pytest.approx(2 * train_seconds(a.rows, stage))
    # 100 epochs of 100,000 at batch 1024 on 8 H100s at 8,600 pairs/s each, 0.9 efficient
    steps = (100_000 // 1024) * 100
    assert train_seconds(a.rows, "sp-seed0") == pytest.approx(steps * 1024 / (8_600 * 8 * 0.9))
    assert b.gpu_hours > a.gpu_hours


def test_the_sp_remine_arm_adds_its_rounds_to_the_sp_arm_s_time() -> None:
    data = ds.KNOWN["stl10"]
    hw = parse_hardware("h100x8", 8)
    base = stl10_config()
    c = replace(base, arms=["plain", "sp", "sp-remine"], remine_every=25)
    rows = {r.stage: r for r in plan_pipeline(c, data, hw).rows}
    sp, remine = rows["sp-seed0"], rows["sp-remine-seed0"]
    assert "3 re-mining rounds" in remine.work and "re-mining" not in sp.work
    n = data.split("unlabeled")
    embed = tp.embed_rate("resnet50", False, 96).value * hw.speed * 8
    search = tp.search_seconds(5_000, n, 2048) / (hw.speed * 8)  # K = 5% of 100,000
    assert remine.wall_s - sp.wall_s == pytest.approx(3 * (n / embed + search))


def test_slower_and_fewer_gpus_take_longer() -> None:
    _, c = parse_config(
        ["pretrain", "s3://b/d", "s3://b/o", "--config", str(JOBS / "pretrain-cifar10.yaml")]
    )
    data = ds.KNOWN["cifar10"]
    h100 = plan_pretrain(c, data, parse_hardware("h100x8", 8), None)
    a100 = plan_pretrain(c, data, parse_hardware("a100x8", 8), None)
    assert train_seconds(a100.rows, "pretrain") == pytest.approx(
        2 * train_seconds(h100.rows, "pretrain"),
        rel=0.01,  # A100: 0.5 x H100 (the monitor too)
    )
    four = replace(c, workers=4)
    assert plan_pretrain(four, data, parse_hardware("h100x8", 8), None).wall_s > h100.wall_s
    with pytest.raises(SeppError, match="workers=8 needs 8 GPUs"):
        plan_pretrain(c, data, parse_hardware("h100x4", 8), None)


@pytest.mark.parametrize(
    ("spec", "count", "kind"), [("h100x8", 8, "h100"), ("a100", 3, "a100"), (None, 3, "h100")]
)
def test_hardware_names_a_kind_and_a_count(spec: str | None, count: int, kind: str) -> None:
    hw = parse_hardware(spec, 3)
    assert (hw.kind, hw.count, hw.assumed) == (kind, count, spec is None)


@pytest.mark.parametrize("spec", ["tpu", "h100x0", "8xh100", "h100-8"])
def test_unknown_hardware_is_refused(spec: str) -> None:
    with pytest.raises(SeppError, match="h100"):
        parse_hardware(spec, 1)


def test_unmeasured_workloads_are_scaled_and_say_so() -> None:
    measured = tp.embed_rate("resnet50", False, 224)
    assert measured.measured and measured.value == 13_100
    small = tp.embed_rate("resnet50", False, 112)
    assert not small.measured and "scaled by forward FLOPs" in small.source
    assert small.value == pytest.approx(4 * measured.value, rel=0.1)  # a quarter of the pixels
    assert tp.search_seconds(64_000, 1_281_167, 2048) == pytest.approx(3.65)
    assert tp.search_seconds(32_000, 1_281_167, 512) == pytest.approx(3.65 / 8)


def test_the_plan_cites_every_figure_it_uses() -> None:
    c = digits_config()
    data = ds.source_size("digits", "auto", c.source_options)
    assert data is not None
    text = format_plan(plan_pipeline(c, data, parse_hardware("l4x1", 1)))
    cited = set(re.findall(r"^  \[(\d+)\] ", text, flags=re.M))
    rows = rows_of(text)
    refs = {n for s, r in rows.items() if s != "total" for n in r["figs"].split(",")}
    assert all(rows[s]["figs"] for s in rows if s != "total")
    assert refs == cited
    assert "L4 speed: 0.15 x H100 (estimate" in text


# ---- sizing the data without reading it ------------------------------------------------------


def test_a_local_ingested_dataset_is_sized_by_its_manifest(tmp_path: Path) -> None:
    manifest = {
        "kind": "images",
        "splits": {"train": {"total": 900}, "val": {"total": 50}, "test": {"total": 200}},
        "image_size": {"width": [64, 64], "height": [64, 64], "uniform": True},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    size = ds.ingested_size(str(tmp_path))
    assert size is not None and size.ingested
    assert size.splits == {"train": 900, "val": 50, "test": 200} and size.side == 64
    assert ds.ingested_size("s3://bkt/never-read") is None


def test_named_sources_are_sized_from_their_published_splits() -> None:
    o = PipelineConfig().source_options
    stl = ds.source_size("s3://b/stl10_binary", "stl10", replace(o, stl10_splits="train,test"))
    assert stl is not None and stl.splits == {"train": 5_000, "test": 8_000} and stl.side == 96
    in100 = ds.source_size("s3://b/imagenet", "imagefolder", replace(o, classes="imagenet100"))
    assert in100 is not None and in100.splits["train"] == 126_689
    assert ds.source_size("s3://b/imagenet", "imagefolder", o) is None
    carved = ds.carve_val(ds.KNOWN["cifar10"], 0.1)
    assert carved.splits == {"train": 45_000, "test": 10_000, "val": 5_000}


def test_a_local_imagefolder_is_sized_by_listing_it(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                (tmp_path / split / cls / f"{i}.png").write_bytes(b"not read")
    size = ds.source_size(str(tmp_path), "auto", PipelineConfig().source_options)
    assert size is not None and size.splits == {"test": 4, "train": 6}


@pytest.mark.parametrize(("value", "train"), [("imagenet", 1_281_167), ("12_000", 12_000)])
def test_data_size_option(value: str, train: int) -> None:
    assert ds.from_option(value).splits["train"] == train


def test_a_bad_data_size_is_refused() -> None:
    with pytest.raises(SeppError, match="known dataset"):
        ds.from_option("imagenet-22k")


# ---- the README's cost table is the dry run's ------------------------------------------------


def gpu_hours_text(hours: float) -> str:
    return f"{hours:.1f}" if hours < 10 else f"{hours:,.0f}"


def readme_costs() -> list[list[str]]:
    text = (JOBS / "README.md").read_text()
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| `pipeline-")
    ]
    return [r for r in rows if len(r) == 6]  # the cost table's, not the file table's


def test_jobs_readme_lists_every_paper_recipe() -> None:
    listed = {row[0].strip("`") for row in readme_costs()}
    assert listed == set(PIPELINES) - {"pipeline-digits.yaml"}


@pytest.mark.parametrize("row", readme_costs(), ids=lambda r: r[0])
def test_jobs_readme_costs_are_the_dry_runs(row: list[str]) -> None:
    """The figures jobs/README.md quotes are what `--dry-run` prints for the recipe."""
    name, cluster, _, h100_hours, a100_hours, a100_wall = row
    m = re.match(r"(\d+) nodes? x (\d+) GPUs", cluster)
    assert m, cluster
    gpus = int(m[1]) * int(m[2])
    _, c = parse_config(["pipeline", "s3://bkt/raw", "--config", str(JOBS / name.strip("`"))])
    assert c.pretrain.workers == gpus  # the recipe trains on the cluster it names
    size = ds.source_size(c.source, c.format, c.source_options)
    assert size is not None
    size = ds.carve_val(size, c.images.val_fraction)
    h100 = plan_pipeline(c, size, parse_hardware(f"h100x{gpus}", gpus))
    a100 = plan_pipeline(c, size, parse_hardware(f"a100x{gpus}", gpus))
    assert (h100_hours, a100_hours) == (
        gpu_hours_text(h100.gpu_hours),
        gpu_hours_text(a100.gpu_hours),
    )
    assert a100_wall == duration(a100.wall_s)
