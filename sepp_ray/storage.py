"""URIs, filesystems, atomic writes and manifests.

Every input and output of sepp-ray is a URI: a local path, ``file://...`` or
``s3://bucket/prefix``. A location is *complete* only once its ``manifest.json`` is written,
and it is written last: readers refuse a location without one, so a crashed or interrupted
write never looks finished. Writers mark a location they own with a ``_SEPP_WRITING`` file,
so a retry may clean up after a crash without ever deleting a user's unrelated files.

S3: credentials come from the standard AWS chain (environment, config files, instance role).
An S3-compatible store is reached through ``SEPP_S3_ENDPOINT`` or the standard
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` variables.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from sepp_ray.errors import IncompleteError, SeppError

MANIFEST = "manifest.json"
WRITING_MARKER = "_SEPP_WRITING"
_REMOTE = ("s3",)


def s3_endpoint() -> str | None:
    """The custom S3 endpoint, if one is configured."""
    for var in ("SEPP_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


@lru_cache(maxsize=8)
def _s3fs(endpoint: str | None) -> AbstractFileSystem:
    import s3fs

    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    # Fail fast on an unreachable store instead of retrying for minutes.
    config_kwargs = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}
    return s3fs.S3FileSystem(
        client_kwargs=client_kwargs, config_kwargs=config_kwargs, skip_instance_cache=True
    )


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem of ``uri`` and the path to use on it (no protocol prefix)."""
    if "://" in uri:
        protocol, rest = uri.split("://", 1)
    else:
        protocol, rest = "file", uri
    if protocol in ("s3", "s3a"):
        if not rest.strip("/"):
            raise SeppError(f"{uri!r} names no bucket: use s3://BUCKET/PREFIX")
        return _s3fs(s3_endpoint()), rest.rstrip("/")
    if protocol == "file":
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(rest))
    raise SeppError(
        f"unsupported URI scheme {protocol!r} in {uri!r}: use a local path, file:// or s3://"
    )


def absolute(uri: str) -> str:
    """``uri`` with a local path made absolute, so Ray workers (whose working directory is not
    the driver's: Ray Train moves them into its own run folder) resolve it to the same place."""
    if "://" in uri:
        protocol, rest = uri.split("://", 1)
        if protocol != "file":
            return uri
        return "file://" + os.path.abspath(os.path.expanduser(rest))
    return os.path.abspath(os.path.expanduser(uri)) if uri else uri


def is_remote(uri: str) -> bool:
    return "://" in uri and uri.split("://", 1)[0] in ("s3", "s3a")


def ray_storage_path(uri: str) -> str:
    """``uri`` as Ray Train and Tune take a ``storage_path``: the bucket path without its
    scheme for object storage (with `ray_storage_filesystem`), a local absolute path else."""
    return filesystem(uri)[1] if is_remote(uri) else Location(uri).path


def ray_storage_filesystem(uri: str) -> Any:
    """The ``storage_filesystem`` for Ray Train and Tune: our fsspec filesystem of an object
    store wrapped for pyarrow, so Ray reaches it with the same endpoint and credentials as the
    rest of sepp-ray; None for a local path (Ray's own default)."""
    if not is_remote(uri):
        return None
    return pafs.PyFileSystem(_StoreHandler(filesystem(uri)[0]))


class _StoreHandler(pafs.FSSpecHandler):
    """Equal to the handler of the same store in any process: fsspec's own equality compares
    instance tokens, which include the process and thread, and Ray Train accepts a checkpoint
    written in place only on a filesystem equal to its run's."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, pafs.FSSpecHandler):
            return NotImplemented
        a, b = self.fs, other.fs
        return type(a) is type(b) and a.storage_options == b.storage_options

    def __hash__(self) -> int:
        return hash(type(self.fs))


@dataclass(frozen=True)
class Location:
    """A directory-like place named by a URI, with its filesystem resolved."""

    uri: str

    @property
    def fs(self) -> AbstractFileSystem:
        return filesystem(self.uri)[0]

    @property
    def path(self) -> str:
        return filesystem(self.uri)[1]

    def join(self, *parts: str) -> str:
        """Full path (on ``fs``) of a child."""
        return posixpath.join(self.path, *parts)

    def child(self, *parts: str) -> Location:
        base = self.uri.rstrip("/")
        return Location(posixpath.join(base, *parts))

    def exists(self, name: str = "") -> bool:
        return bool(self.fs.exists(self.join(name) if name else self.path))

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self.join(name), "rb") as f:
            return bytes(f.read())

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a child file atomically: readers see the old file, or the whole new one."""
        write_atomic(self.fs, self.join(name), data)

    def listdir(self) -> list[str]:
        """Child names (files and directories); empty when the location does not exist."""
        if not self.fs.exists(self.path):
            return []
        return sorted(
            posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path, detail=False)
        )


def write_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Local: write a temp file then rename. S3: a single PUT is already atomic."""
    parent = posixpath.dirname(path)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def check_reachable(uri: str) -> None:
    """Raise a clear error when an object-store bucket cannot be reached or does not exist."""
    if not is_remote(uri):
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError as e:
        raise SeppError(
            f"bucket s3://{bucket} does not exist or is not visible with these credentials: "
            "create it or fix the URI"
        ) from e
    except Exception as e:  # botocore raises many kinds: all mean "cannot reach"
        raise SeppError(
            f"cannot reach bucket s3://{bucket} (endpoint {s3_endpoint() or 'AWS default'}): "
            f"{type(e).__name__}: {e}. Check the endpoint (SEPP_S3_ENDPOINT / AWS_ENDPOINT_URL) "
            "and credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / instance role)."
        ) from e


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a complete location; IncompleteError when there is none."""
    loc = Location(uri)
    check_reachable(uri)
    if not loc.exists(MANIFEST):
        what = "is being written or a write crashed" if loc.exists(WRITING_MARKER) else "has none"
        raise IncompleteError(
            f"{uri} is not a complete sepp-ray output: it {what} (no {MANIFEST}). "
            "Run the command that produces it (again) before reading it."
        )
    try:
        return dict(json.loads(loc.read_bytes(MANIFEST)))
    except json.JSONDecodeError as e:
        raise SeppError(f"{uri}/{MANIFEST} is not valid JSON ({e}): rewrite the output") from e


def begin_write(uri: str, overwrite: bool = False, keep: tuple[str, ...] = ()) -> Location:
    """Claim ``uri`` for a new output.

    Refuses a complete output unless ``overwrite``; cleans up a crashed write of ours; refuses
    a non-empty location that sepp-ray did not write (we never delete a user's files).
    The manifest goes first when overwriting, so the location stops looking complete at once.
    ``keep`` names children to leave in place (a complete sub-result the caller will reuse).
    """
    check_reachable(uri)
    loc = Location(uri)
    names = loc.listdir()
    if MANIFEST in names:
        if not overwrite:
            raise SeppError(
                f"{uri} already holds a complete result; pass --overwrite (overwrite=true) "
                "to replace it, or choose another output location"
            )
        loc.fs.rm(loc.join(MANIFEST))
        names.remove(MANIFEST)
        _clear(loc, [n for n in names if n not in keep])
    elif names:
        if WRITING_MARKER not in names:
            raise SeppError(
                f"{uri} is not empty and was not written by sepp-ray; refusing to write into it. "
                "Choose an empty or new location."
            )
        _clear(loc, [n for n in names if n not in keep])
    loc.write_bytes(WRITING_MARKER, json.dumps({"started": time.time()}).encode())
    return loc


def _clear(loc: Location, names: list[str]) -> None:
    for name in names:
        if name != WRITING_MARKER:
            loc.fs.rm(loc.join(name), recursive=True)


def finish_write(loc: Location, manifest: dict[str, Any]) -> None:
    """Write the manifest, last, which makes the location complete; then drop the marker."""
    manifest = {"format_version": 1, "created_unix": time.time(), **manifest}
    loc.write_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=False).encode())
    if loc.exists(WRITING_MARKER):
        loc.fs.rm(loc.join(WRITING_MARKER))
