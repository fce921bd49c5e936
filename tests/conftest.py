"""Session-wide fixtures: one real local Ray cluster and one real S3-compatible server.

The S3 server (moto in server mode, on 127.0.0.1) starts before Ray, so the endpoint and test
credentials are in the environment that Ray's worker processes inherit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"  # type: ignore[union-attr]
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "SEPP_S3_ENDPOINT": endpoint,
        }
    )
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(var, None)
    yield endpoint
    server.stop()


@pytest.fixture
def bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the test server; returns its s3:// URI."""
    import boto3

    name = f"sepp-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


DASHBOARD_URL = pytest.StashKey[str]()


@contextlib.contextmanager
def _agent_port_from_os() -> Iterator[None]:
    """Have the dashboard agent's HTTP server (the job server's back end) bind a port the OS
    picks, as Ray's own worker nodes do: its fixed default (52365) is taken by any other Ray
    cluster on the machine, and `ray.init` has no argument for it."""
    from ray._private import parameter

    base = parameter.RayParams

    class Params(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.dashboard_agent_listen_port = 0

    parameter.RayParams = Params  # type: ignore[misc]
    try:
        yield
    finally:
        parameter.RayParams = base  # type: ignore[misc]


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """The session's local Ray cluster (2 CPUs); returns its address for subprocess drivers.

    It runs the dashboard (the Ray Job Submission server) on 127.0.0.1, on ports the OS picks,
    so jobs can be submitted to it (`ray_dashboard`). It has a temp dir of its own: Ray's job
    supervisor gives a job's driver the cluster recorded in the temp dir's
    `ray_current_cluster` (as `ray start` writes it), and any Ray cluster started on this
    machine may overwrite the shared /tmp/ray one."""
    import ray
    from ray._private.utils import write_ray_address
    from ray.data import DataContext

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: socket paths have a limit
    with _agent_port_from_os():
        ctx = ray.init(
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=0,
            log_to_driver=False,
            _temp_dir=temp_dir,
        )
    request.config.stash[DASHBOARD_URL] = f"http://{ctx.dashboard_url}"
    DataContext.get_current().enable_progress_bars = False
    address = ray.get_runtime_context().gcs_address
    write_ray_address(address, temp_dir)
    yield address
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_dashboard(ray_cluster: str, request: pytest.FixtureRequest) -> str:
    """The session cluster's dashboard URL (http://127.0.0.1:PORT): the address to give
    `ray job submit --address` or `JobSubmissionClient`."""
    url = request.config.stash[DASHBOARD_URL]
    if url.endswith("None"):
        pytest.fail("the session cluster's dashboard did not start (is ray[default] installed?)")
    return url
