"""jobs/: the shipped stage configs load and validate, the runtime env is valid and carries the
project's requirements, and stages run as Ray jobs submitted with the Job Submission SDK to the
session cluster's job server (127.0.0.1): a real stage succeeds from the uploaded working dir,
and a bad config fails within seconds, before the job's driver joins the cluster.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sepp_ray.cli import COMMANDS, parse_config
from sepp_ray.data.classlists import load_class_list, parse_class_list
from sepp_ray.errors import SeppError
from sepp_ray.eval.command import EvalConfig
from sepp_ray.flow.pipeline import PipelineConfig, check_arms
from sepp_ray.train.driver import PretrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest's own dependency below 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
STAGE_FILES = {
    "ingest-cifar10.yaml": "ingest",
    "embed-cifar10.yaml": "embed",
    "mine-cifar10.yaml": "mine",
    "pretrain-cifar10.yaml": "pretrain",
    "eval-cifar10.yaml": "eval",
    "pipeline-cifar10.yaml": "pipeline",
    "pipeline-digits.yaml": "pipeline",
    "pipeline-stl10.yaml": "pipeline",
    "pipeline-imagenet100.yaml": "pipeline",
    "pipeline-imagenet.yaml": "pipeline",
    "sweep-digits.yaml": "sweep",
}
# what each command gets on the command line besides its positionals
COMMAND_LINE = {"eval": ["checkpoints=s3://b/a/checkpoints/epoch-00800"]}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def validate_tree(node: Any) -> None:
    """Call every ``validate`` in a config tree, as the commands do before their first Ray call.
    A pretrain section inside a pipeline gets its URIs from the pipeline: its settings are
    checked without them, as the pipeline does."""
    if isinstance(node, PretrainConfig) and not node.dataset:
        node.validate_settings()
    elif hasattr(node, "validate"):
        node.validate()
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            validate_tree(value)


@pytest.mark.parametrize("name", sorted(STAGE_FILES))
def test_stage_config_loads_and_validates(name: str) -> None:
    command = STAGE_FILES[name]
    path = JOBS / name
    spec = COMMANDS[command]
    raw = yaml.safe_load(path.read_text())
    # URIs come on the command line: a positional in the file would silently override them
    assert not set(spec.positionals) & set(raw), f"{name} sets {spec.positionals}"
    positionals = [f"s3://b/{p}" for p in spec.positionals]
    argv = [command, *positionals, "--config", str(path), *COMMAND_LINE.get(command, [])]
    got, config = parse_config(argv)
    assert got is spec
    validate_tree(config)
    if isinstance(config, PipelineConfig):  # checked by later stages of a pipeline run
        check_arms(config)
        EvalConfig(checkpoints=["c"], dataset="d", out="o", protocols=config.protocols).validate()
    assert all(getattr(config, p) == v for p, v in zip(spec.positionals, positionals, strict=True))


def test_every_config_in_jobs_is_validated() -> None:
    """A recipe added to jobs/ is checked here (and dry-runs in tests/test_dryrun.py)."""
    shipped = {p.name for p in JOBS.glob("*.yaml")} - {"runtime_env.yaml"}
    assert shipped == set(STAGE_FILES)


def test_a_typo_in_a_stage_config_is_caught(tmp_path: Path) -> None:
    bad = tmp_path / "pretrain.yaml"
    bad.write_text((JOBS / "pretrain-cifar10.yaml").read_text().replace("epochs:", "epoch:", 1))
    with pytest.raises(Exception, match="unknown config key"):
        parse_config(["pretrain", "s3://b/d", "s3://b/o", "--config", str(bad)])


def runtime_env_file() -> dict[str, Any]:
    return yaml.safe_load((JOBS / "runtime_env.yaml").read_text())


def test_runtime_env_is_valid_and_carries_the_requirements() -> None:
    from ray.runtime_env import RuntimeEnv

    env = runtime_env_file()
    RuntimeEnv(**env)  # Ray's own parsing and validation of every field
    assert env["working_dir"] == "."
    assert {".git", ".venv", "runs"} <= set(env["excludes"])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert env["pip"]["packages"] == project["dependencies"]


def test_runtime_env_check_bites() -> None:
    from ray.runtime_env import RuntimeEnv

    with pytest.raises((TypeError, ValueError)):
        RuntimeEnv(**{**runtime_env_file(), "pip": {"packages": ["x"], "pip_chek": False}})


# ---- the recipes' class lists ----------------------------------------------------------------

WNID = re.compile(r"^n\d{8}$")


def test_imagenet100_is_100_distinct_imagenet_classes() -> None:
    """CMC's ImageNet-100 (arXiv 1906.05849): 100 WordNet ids, each an ILSVRC-2012 class."""
    in100 = load_class_list("imagenet100").classes
    in1k = load_class_list("imagenet1k").classes
    assert len(in100) == len(set(in100)) == 100
    assert all(WNID.match(c) for c in in100)
    assert len(in1k) == len(set(in1k)) == 1000 and list(in1k) == sorted(in1k)
    assert set(in100) <= set(in1k)
    assert in100[:3] == ("n02869837", "n01749939", "n02488291")  # the list's own order


def write_tree(root: Path, classes: dict[str, list[str]]) -> None:
    """An ImageFolder tree: split -> its class folders, two files each (never decoded here)."""
    for split, names in classes.items():
        for cls in names:
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                (root / split / cls / f"{i}.JPEG").write_bytes(b"not read")


def test_the_class_filter_keeps_the_listed_classes(tmp_path: Path) -> None:
    from sepp_ray.data.sources import SourceOptions, open_source

    listed = ["n00000002", "n00000001"]
    write_tree(tmp_path / "tree", {s: [*listed, "n00000003"] for s in ("train", "test")})
    (tmp_path / "subset.txt").write_text("# a subset\n" + "\n".join(listed) + "\n")
    options = SourceOptions(classes=str(tmp_path / "subset.txt"))
    src: Any = open_source(str(tmp_path / "tree"), "imagefolder", options)
    assert src.class_names() == sorted(listed)
    assert src.excluded == 4 and len(src._files) == 8
    assert src.describe()["classes"] == str(tmp_path / "subset.txt")
    unfiltered: Any = open_source(str(tmp_path / "tree"), "imagefolder", SourceOptions())
    assert "classes" not in unfiltered.describe()
    assert unfiltered.fingerprint() != src.fingerprint()


def test_the_class_filter_refuses_a_tree_lacking_a_listed_class(tmp_path: Path) -> None:
    from sepp_ray.data.sources import SourceOptions, open_source

    write_tree(tmp_path, {"train": ["n00000001", "n00000002"], "test": ["n00000001"]})
    (tmp_path.parent / "two.txt").write_text("n00000001\nn00000002\n")
    options = SourceOptions(classes=str(tmp_path.parent / "two.txt"))
    with pytest.raises(SeppError, match=r"split 'test' .* lacks 1 of the 2 classes .*n00000002"):
        open_source(str(tmp_path), "imagefolder", options)


def test_imagenet100_is_refused_on_a_partial_imagenet(tmp_path: Path) -> None:
    from sepp_ray.data.sources import SourceOptions, open_source

    in100 = load_class_list("imagenet100").classes
    write_tree(tmp_path, {"train": list(in100[:-1]), "test": list(in100)})
    with pytest.raises(
        SeppError, match=rf"lacks 1 of the 100 classes of class list imagenet100 \({in100[-1]}\)"
    ):
        open_source(str(tmp_path), "imagefolder", SourceOptions(classes="imagenet100"))


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "names no class"), ("n1\nn2\nn1\n", "names n1 more than once")],
)
def test_a_bad_class_list_is_refused(text: str, message: str) -> None:
    with pytest.raises(SeppError, match=message):
        parse_class_list(text, "list.txt")


def test_an_unknown_class_list_names_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(SeppError, match="imagenet100, imagenet1k"):
        load_class_list(str(tmp_path / "imagenet-100"))


# ---- jobs on the session cluster ---------------------------------------------------------------


def job_runtime_env() -> dict[str, Any]:
    """jobs/runtime_env.yaml as the tests can use it: the working dir made absolute (the CLI
    resolves '.' where `ray job submit` runs, the repository root), and no `pip` section:
    installing requirements needs the network, and the session cluster runs in the venv that
    already has them."""
    env = {k: v for k, v in runtime_env_file().items() if k != "pip"}
    env["working_dir"] = str(REPO)
    return env


def wait(client: Any, job_id: str, timeout: float) -> str:
    """The job's terminal status; a job still running after ``timeout`` is stopped and fails
    the test with its logs."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(0.5)
    client.stop_job(job_id)
    logs = client.get_job_logs(job_id)
    raise AssertionError(f"job {job_id} not finished after {timeout} s:\n{logs}")


@pytest.fixture(scope="module")
def client(ray_dashboard: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    assert ray_dashboard.startswith("http://127.0.0.1:")
    return JobSubmissionClient(ray_dashboard)


def test_a_stage_runs_as_a_job_from_the_uploaded_working_dir(client: Any, tmp_path: Path) -> None:
    """A real stage (ingest) submitted like `ray job submit --runtime-env jobs/runtime_env.yaml`
    succeeds, writes its output, and ran the uploaded code, not the checkout's."""
    out = tmp_path / "syn"
    probe = (
        "import os, sepp_ray; "
        "print('SEPP_FROM', os.path.dirname(os.path.abspath(sepp_ray.__file__))); "
        "print('CWD_HOLDS', sorted(os.listdir('.')))"
    )
    entrypoint = (
        f'{sys.executable} -c "{probe}" && '
        f"{sys.executable} -m sepp_ray.cli ingest synthetic {out} "
        "source_options.n=40 source_options.size=16 source_options.chunk_size=20"
    )
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env())
    status = wait(client, job_id, timeout=240)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs
    assert (out / "manifest.json").exists()
    assert re.search(rf"ingested 40 images \(.*; 0 skipped\) into {re.escape(str(out))}\n", logs)
    # the job ran the uploaded copy of the checkout, without what runtime_env.yaml excludes
    shipped = logs.split("SEPP_FROM ", 1)[1].split("\n", 1)[0]
    assert not shipped.startswith(str(REPO)) and shipped.endswith("sepp_ray")
    listing = yaml.safe_load(logs.split("CWD_HOLDS ", 1)[1].split("\n", 1)[0])
    assert {"sepp_ray", "jobs", "pyproject.toml"} <= set(listing)
    assert not {".git", ".venv", "runs"} & set(listing)
    info = client.get_job_info(job_id)
    assert info.driver_info is not None  # the driver joined the cluster (RAY_ADDRESS)


BAD_CONFIGS = {
    # a typo in a YAML config given with --config
    "typo": (["--config", "{bad_yaml}", "epochs=1"], "unknown config key(s) epoch;"),
    # a dataset that is not there
    "missing": ([], "is not a complete sepp-ray output"),
}


def test_a_bad_config_fails_fast_before_joining_the_cluster(client: Any, tmp_path: Path) -> None:
    """`sepp pretrain` jobs with a bad config fail in seconds with the CLI's one-line error,
    and their driver never connected to the cluster (so it took no CPU, GPU or actor)."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: simclr\nepoch: 5\n")
    submitted: dict[str, tuple[str, float]] = {}
    for name, (extra, _) in BAD_CONFIGS.items():
        args = " ".join(a.format(bad_yaml=bad_yaml) for a in extra)
        entrypoint = (
            f"{sys.executable} -m sepp_ray.cli pretrain {tmp_path / 'no-such-dataset'} "
            f"{tmp_path / name} {args}"
        )
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env())
        submitted[name] = (job_id, time.monotonic())
    for name, (job_id, t0) in submitted.items():
        status = wait(client, job_id, timeout=120)
        elapsed = time.monotonic() - t0
        logs = client.get_job_logs(job_id)
        info = client.get_job_info(job_id)
        assert status == "FAILED", logs
        assert elapsed < 60, f"{name}: {elapsed:.0f} s to fail"
        assert "sepp: error: " in logs and BAD_CONFIGS[name][1] in logs, logs
        assert "Traceback" not in logs, logs
        assert info.driver_exit_code == 2
        # the entrypoint never called ray.init: no driver, so no task, actor or resource taken
        assert info.driver_info is None
        assert not (tmp_path / name).exists()
