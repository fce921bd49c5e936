"""Storage sanity on clusters: every node must see the same data and outputs.

On one machine a local path is fine. On a cluster of several nodes, Ray tasks, actors and
training ranks run on nodes whose disks the driver does not see: a local input path is missing
(or different) there, and local outputs scatter over the nodes' disks, so the manifest the
driver writes describes files that are not where it says. Before a stage takes resources, a
local path for data, outputs or Ray's own storage on a multi-node cluster is therefore an
error naming the fix: ``s3://`` (or an S3-compatible store), or a file system that every node
mounts at the same path (EFS, FSx for Lustre, NFS), declared in ``$SEPP_SHARED_FS``.
"""

from __future__ import annotations

import os

from sepp_ray.errors import SeppError
from sepp_ray.storage import is_remote

SHARED_ENV = "SEPP_SHARED_FS"


def shared_roots() -> list[str]:
    """The declared shared mount points (``$SEPP_SHARED_FS``, colon-separated), absolute."""
    raw = os.environ.get(SHARED_ENV, "")
    return [os.path.abspath(os.path.expanduser(p)) for p in raw.split(os.pathsep) if p.strip()]


def _local_path(uri: str) -> str:
    path = uri.split("://", 1)[1] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def is_shared(uri: str, roots: list[str] | None = None) -> bool:
    """True for object storage and for local paths under a declared shared mount."""
    if is_remote(uri):
        return True
    path = _local_path(uri)
    for root in shared_roots() if roots is None else roots:
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive (the head included: drivers run there
    and read what the workers wrote)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_shared_storage(uris: dict[str, str | None], nodes: int | None = None) -> None:
    """Refuse local paths among ``uris`` (option name -> URI; empty ones are skipped) on a
    cluster of more than one node. ``nodes``: the node count (default: the connected cluster's).
    """
    given = {k: u for k, u in uris.items() if u}
    if not given:
        return
    n = alive_nodes() if nodes is None else nodes
    if n <= 1:
        return
    local = {k: u for k, u in given.items() if not is_shared(u)}
    if local:
        shown = ", ".join(f"{k}={u}" for k, u in local.items())
        raise SeppError(
            f"{shown}: a local path on a Ray cluster of {n} nodes, where each node would read "
            "and write its own disk. Use object storage (s3://BUCKET/PREFIX), or a file "
            "system mounted at the same path on every node and declared in "
            f"{SHARED_ENV}=/mnt/shared (colon-separated for several)"
        )
