"""Storage sanity on clusters: every node must see the same data and outputs.

On one machine a local path is fine. On a cluster of several nodes, Ray tasks, actors and
training ranks run on nodes whose disks the driver does not see: a local input path is missing
(or different) there, and local outputs scatter over the nodes' disks, so the manifest the
driver writes describes files that are not where it says. Before a stage takes resources, a
local path for data, outputs or Ray's own storage on a multi-node cluster is therefore an
error naming the fix: ``s3://`` (or an S3-compatible store), or a file system that every node
mounts at the same path (EFS, FSx for Lustre, NFS), declared in ``$SEPP_SHARED_FS``.

"Multi-node" counts the nodes the cluster can have, not those alive now: an autoscaling cluster
often starts with its head alone, and the workers it adds later would write where the head
cannot read. Ray 2.60 has no public API for the autoscaler's limits (``ray.nodes()`` and
``ray.cluster_resources()`` see live nodes only; ``ray.autoscaler.sdk`` requests resources and
drives the cluster launcher from the config file on the user's machine; the autoscaler's state
API lives under ``ray.autoscaler.v2``, not a public module), so the limit is read where the
autoscaler itself reads it: the cluster config that ``ray up`` leaves on the head node as
``~/ray_bootstrap_config.yaml`` (the head's autoscaler is started with it, and Ray Tune checks
for the same file to tell a launched cluster). A KubeRay cluster keeps its limits in its
Kubernetes resource, out of reach from inside: its worker groups are taken to be able to add
nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sepp_ray.errors import SeppError
from sepp_ray.storage import is_remote

SHARED_ENV = "SEPP_SHARED_FS"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # what `ray up` writes on the head node
KUBERAY_ENV = "RAY_USAGE_STATS_KUBERAY_IN_USE"  # set by KubeRay in its Ray containers
RAY_DEFAULT_MAX_WORKERS = 2  # the autoscaler's max_workers when a config names none


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


def configured_max_nodes(path: str = BOOTSTRAP_CONFIG) -> int | None:
    """1 (the head) + the most worker nodes a cluster config lets the autoscaler start: its
    ``max_workers``, and at most the sum of its node types' ``max_workers`` when every type
    names one; None when there is no such file (a cluster started by hand, or none at all)."""
    import yaml

    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        return None
    with open(full) as f:
        cfg: dict[str, Any] = yaml.safe_load(f) or {}
    bounds = []
    if cfg.get("max_workers") is not None:
        bounds.append(int(cfg["max_workers"]))
    types = list((cfg.get("available_node_types") or {}).values())
    if types and all(t.get("max_workers") is not None for t in types):
        bounds.append(sum(int(t["max_workers"]) for t in types))
    return 1 + (min(bounds) if bounds else RAY_DEFAULT_MAX_WORKERS)


def _head_host_node() -> str | None:
    """A node on the head's host (the GCS runs there) when this process runs on another host,
    else None (the head's files are on this disk)."""
    import ray

    head_ip = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    if head_ip == ray.util.get_node_ip_address():
        return None
    for n in ray.nodes():
        if n.get("Alive") and n.get("NodeManagerAddress") == head_ip:
            return str(n["NodeID"])
    return None


def autoscaler_max_nodes() -> int | None:
    """`configured_max_nodes` of the connected cluster, read on its head node: here when this
    driver runs there (a `ray job submit` driver does), else in a task pinned to the head."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = _head_host_node()
    if head is None:
        return configured_max_nodes()
    on_head = NodeAffinitySchedulingStrategy(node_id=head, soft=False)
    task = ray.remote(num_cpus=0)(configured_max_nodes).options(scheduling_strategy=on_head)
    return ray.get(task.remote(), timeout=120)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ClusterSize:
    """The most nodes the cluster has or can have, and how that was found."""

    nodes: int
    why: str = ""

    def text(self) -> str:
        return f"{self.nodes} nodes" + (f" ({self.why})" if self.why else "")


def cluster_size() -> ClusterSize:
    """The connected cluster's nodes: the autoscaler's configured maximum when it has one, else
    the nodes alive (a KubeRay cluster, whose limit is not readable here, counts as several)."""
    alive = alive_nodes()
    most = autoscaler_max_nodes()
    if most is not None and most > alive:
        why = f"at most, by the autoscaler's max_workers in {BOOTSTRAP_CONFIG}; {alive} alive now"
        return ClusterSize(most, why)
    if alive <= 1 and os.environ.get(KUBERAY_ENV):
        return ClusterSize(2, "or more: a KubeRay cluster, whose worker groups can add nodes")
    return ClusterSize(alive)


def check_shared_storage(uris: dict[str, str | None], nodes: int | None = None) -> None:
    """Refuse local paths among ``uris`` (option name -> URI; empty ones are skipped) on a
    cluster that has or can have more than one node. ``nodes``: the node count (default: the
    connected cluster's, `cluster_size`)."""
    given = {k: u for k, u in uris.items() if u}
    if not given:
        return
    local = {k: u for k, u in given.items() if not is_shared(u)}
    if not local:
        return
    size = cluster_size() if nodes is None else ClusterSize(nodes)
    if size.nodes <= 1:
        return
    shown = ", ".join(f"{k}={u}" for k, u in local.items())
    raise SeppError(
        f"{shown}: a local path on a Ray cluster of {size.text()}, where each node would "
        "read and write its own disk. Use object storage (s3://BUCKET/PREFIX), or a file "
        "system mounted at the same path on every node and declared in "
        f"{SHARED_ENV}=/mnt/shared (colon-separated for several)"
    )
