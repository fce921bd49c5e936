"""Session-wide fixtures: one real local Ray cluster and one real S3-compatible server.

The S3 server (moto in server mode, on 127.0.0.1) starts before Ray, so the endpoint and test
credentials are in the environment that Ray's worker processes inherit.
"""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str) -> Iterator[str]:
    """The session's local Ray cluster (2 CPUs); returns its address for subprocess drivers."""
    import ray
    from ray.data import DataContext

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    address = ray.get_runtime_context().gcs_address
    yield address
    ray.shutdown()
