"""URIs, manifest-last writes, overwrite rules, on local disk and a real S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sepp_ray.errors import IncompleteError, SeppError
from sepp_ray.storage import (
    MANIFEST,
    WRITING_MARKER,
    Location,
    begin_write,
    filesystem,
    finish_write,
    read_manifest,
)


@pytest.fixture(params=["local", "s3"])
def out_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("bucket") + "/some/prefix"


def test_write_then_read(out_uri: str) -> None:
    loc = begin_write(out_uri)
    loc.write_bytes("data/part-0.bin", b"abc")
    with pytest.raises(IncompleteError, match="being written"):
        read_manifest(out_uri)
    finish_write(loc, {"kind": "test", "n": 1})
    m = read_manifest(out_uri)
    assert m["kind"] == "test" and m["n"] == 1 and m["format_version"] == 1
    assert not loc.exists(WRITING_MARKER)
    assert loc.read_bytes("data/part-0.bin") == b"abc"


def test_complete_output_is_refused_unless_overwrite(out_uri: str) -> None:
    loc = begin_write(out_uri)
    loc.write_bytes("old.bin", b"1")
    finish_write(loc, {"kind": "test"})
    with pytest.raises(SeppError, match="already holds a complete result"):
        begin_write(out_uri)
    loc = begin_write(out_uri, overwrite=True)
    # overwriting removes the manifest first: the location stops looking complete at once
    with pytest.raises(IncompleteError):
        read_manifest(out_uri)
    assert not loc.exists("old.bin")


def test_crashed_write_is_cleaned_by_the_next_writer(out_uri: str) -> None:
    loc = begin_write(out_uri)
    loc.write_bytes("partial.bin", b"half")  # ... and the process dies here
    loc = begin_write(out_uri)  # a retry, without --overwrite
    assert not loc.exists("partial.bin")
    finish_write(loc, {"kind": "test"})
    assert read_manifest(out_uri)["kind"] == "test"


def test_foreign_files_are_never_deleted(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("mine")
    with pytest.raises(SeppError, match="not written by sepp-ray"):
        begin_write(str(tmp_path), overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "mine"


def test_missing_location_is_incomplete(tmp_path: Path) -> None:
    with pytest.raises(IncompleteError, match="has none"):
        read_manifest(str(tmp_path / "nothing"))


def test_corrupt_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(SeppError, match="not valid JSON"):
        read_manifest(str(tmp_path))


def test_uri_forms(tmp_path: Path) -> None:
    fs1, p1 = filesystem(str(tmp_path))
    fs2, p2 = filesystem(f"file://{tmp_path}")
    assert p1 == p2 == str(tmp_path)
    with pytest.raises(SeppError, match="unsupported URI scheme"):
        filesystem("gopher://x/y")
    with pytest.raises(SeppError, match="names no bucket"):
        filesystem("s3://")
    assert Location("s3://b/p").child("x", "y").uri == "s3://b/p/x/y"


def test_missing_bucket_and_unreachable_endpoint(
    s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SeppError, match="does not exist or is not visible"):
        begin_write("s3://no-such-bucket-here/x")
    import socket

    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SEPP_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(SeppError, match="cannot reach bucket s3://anything"):
        read_manifest("s3://anything/x")


def test_manifest_is_json_with_user_fields(tmp_path: Path) -> None:
    loc = begin_write(str(tmp_path / "o"))
    finish_write(loc, {"kind": "k", "nested": {"a": [1, 2]}})
    raw = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert raw["nested"] == {"a": [1, 2]}


def test_absolute_makes_local_paths_absolute_and_leaves_remote_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sepp_ray.storage import absolute

    monkeypatch.chdir(tmp_path)
    assert absolute("runs/x") == str(tmp_path / "runs" / "x")
    assert absolute("file://runs/x") == f"file://{tmp_path / 'runs' / 'x'}"
    assert absolute("s3://bucket/runs/x") == "s3://bucket/runs/x"
    assert absolute("/already/absolute") == "/already/absolute"
