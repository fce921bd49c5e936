"""Storage sanity: on a cluster of several nodes a local path is refused with the fix named
(object storage, or a declared shared file system); one node, s3:// and declared mounts pass.
The 2-node case runs for real on a simulated cluster (ray.cluster_utils.Cluster), in a
subprocess: ``python -m tests.test_storage_sanity EMB_URI OUT_URI`` is that subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sepp_ray.errors import SeppError
from sepp_ray.shared_storage import (
    SHARED_ENV,
    check_shared_storage,
    configured_max_nodes,
    is_shared,
)

REPO = Path(__file__).resolve().parents[1]


def test_one_node_takes_any_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SHARED_ENV, raising=False)
    check_shared_storage({"out": "runs/x", "dataset": "/data/imgs"}, nodes=1)


def test_several_nodes_refuse_a_local_path_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(SHARED_ENV, raising=False)
    with pytest.raises(SeppError) as err:
        check_shared_storage(
            {"dataset": "s3://bkt/imgs", "out": "runs/x", "pairs": "file:///data/p", "x": None},
            nodes=3,
        )
    msg = str(err.value)
    assert msg.startswith("out=runs/x, pairs=file:///data/p: a local path on a Ray cluster of 3")
    assert "s3://BUCKET/PREFIX" in msg and SHARED_ENV in msg
    assert "dataset" not in msg.split(":")[0]  # object storage is fine
    check_shared_storage({"dataset": "s3://bkt/imgs", "out": "s3://bkt/out"}, nodes=3)


def test_a_declared_shared_mount_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SHARED_ENV, os.pathsep.join(["/mnt/fsx", "/efs/"]))
    check_shared_storage({"out": "/mnt/fsx/runs/a", "data": "file:///efs/d"}, nodes=2)
    assert is_shared("/mnt/fsx") and not is_shared("/mnt/fsx2/runs")  # a prefix is not a mount
    with pytest.raises(SeppError, match="out=/home/me/runs"):
        check_shared_storage({"out": "/home/me/runs"}, nodes=2)


def test_the_autoscalers_maximum_is_read_from_the_cluster_config(tmp_path: Path) -> None:
    cfg = tmp_path / "ray_bootstrap_config.yaml"
    assert configured_max_nodes(str(cfg)) is None  # no config: a cluster started by hand
    cfg.write_text("cluster_name: x\nmax_workers: 4\n")
    assert configured_max_nodes(str(cfg)) == 5  # the workers and the head
    types = "available_node_types:\n  head: {max_workers: 0}\n  gpu: {max_workers: 2}\n"
    cfg.write_text("max_workers: 4\n" + types)
    assert configured_max_nodes(str(cfg)) == 3  # the node types allow fewer
    cfg.write_text(types.replace("{max_workers: 2}", "{min_workers: 1}"))
    assert configured_max_nodes(str(cfg)) == 3  # no bound named: Ray's default max_workers, 2


@pytest.mark.usefixtures("ray_cluster")
def test_an_autoscaling_cluster_with_its_head_alone_refuses_a_local_ingest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One node alive, but the cluster config on the head lets the autoscaler add three."""
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import SourceOptions, open_source

    monkeypatch.delenv(SHARED_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ray_bootstrap_config.yaml").write_text("max_workers: 3\n")
    source = open_source("synthetic", options=SourceOptions(n=8, size=8, chunk_size=8))
    with pytest.raises(SeppError) as err:
        ingest(source, str(tmp_path / "out"))
    msg = str(err.value)
    assert "a local path on a Ray cluster of 4 nodes (at most, by the autoscaler's" in msg
    assert "1 alive now" in msg and "s3://" in msg and SHARED_ENV in msg
    assert not (tmp_path / "out").exists(), "refused before writing anything"
    (tmp_path / "ray_bootstrap_config.yaml").write_text("max_workers: 0\n")
    ingest(source, str(tmp_path / "out"))  # a cluster of the head alone takes a local path
    assert (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow  # a simulated cluster; the check itself is tested above
@pytest.mark.usefixtures("ray_cluster")
def test_a_two_node_cluster_refuses_a_local_path(tmp_path: Path) -> None:
    from tests.test_resources import fake_embeddings

    emb = fake_embeddings(str(tmp_path / "emb"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", SHARED_ENV)}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run(
        [sys.executable, "-m", "tests.test_storage_sanity", emb, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.split("RESULT", 1)[1].splitlines()[0])
    assert seen["nodes"] == 2
    assert "a local path on a Ray cluster of 2 nodes" in seen["mine"]
    assert seen["mine"].startswith(f"embeddings={emb}")
    assert seen["ingest"].startswith(f"out={tmp_path / 'img'}: a local path on a Ray cluster")
    assert seen["declared"] == "ok", "a mount declared shared is accepted"
    assert not (tmp_path / "out").exists(), "refused before writing anything"
    assert not (tmp_path / "img").exists(), "refused before writing anything"


def main(emb: str, out: str) -> None:
    """On a 2-node simulated cluster: a real stage (mining) given local paths, then the same
    check with the machine's temp dir declared shared."""
    import ray
    from ray.cluster_utils import Cluster

    from sepp_ray.mining.mine import MineConfig, mine
    from sepp_ray.shared_storage import alive_nodes
    from sepp_ray.storage import Location

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    seen: dict[str, object] = {"nodes": alive_nodes()}
    try:
        mine(emb, Location(out), MineConfig(k=0.5))
        seen["mine"] = "accepted"
    except SeppError as e:
        seen["mine"] = str(e)
    from sepp_ray.data.ingest import ingest
    from sepp_ray.data.sources import SourceOptions, open_source

    try:
        ingest(
            open_source("synthetic", options=SourceOptions(n=8, size=8)),
            str(Path(out).parent / "img"),
        )
        seen["ingest"] = "accepted"
    except SeppError as e:
        seen["ingest"] = str(e)
    os.environ[SHARED_ENV] = str(Path(emb).parent)
    check_shared_storage({"embeddings": emb, "out": out})
    seen["declared"] = "ok"
    print("RESULT", json.dumps(seen), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
