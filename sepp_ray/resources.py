"""GPUs for a stage: ask the autoscaler, wait a bounded time, or fail at once with the fix.

An autoscaling cluster (``cluster.yaml``) may hold fewer GPU nodes than a stage needs, or none
at its minimum. A stage that sized itself on the GPUs present when it starts would then run on
one node, on CPUs, or wait forever for actors that cannot be placed. Every GPU stage (embed,
mine, pretrain, eval, sweep trials) goes through :func:`stage_gpus` / :func:`ensure_gpus`
instead: it asks Ray's autoscaler for the GPU bundles it needs (``request_resources``, Ray's
"Autoscaler SDK" docs), waits up to ``gpu_wait_s`` for them, then proceeds, or raises a
SeppError naming the options that fix it.

``gpu_wait_s`` left unset takes ``$SEPP_GPU_WAIT_S`` (``cluster.yaml`` sets it on the head,
where job drivers run), else 0: fail at once, as on a fixed cluster.
"""

from __future__ import annotations

import logging
import os
import time

from sepp_ray.errors import SeppError

log = logging.getLogger(__name__)
WAIT_ENV = "SEPP_GPU_WAIT_S"
POLL_S = 5.0


def gpu_wait(value: float | None = None) -> float:
    """Seconds a stage waits for GPUs: ``value``, else ``$SEPP_GPU_WAIT_S``, else 0."""
    if value is not None:
        wait = float(value)
    else:
        raw = os.environ.get(WAIT_ENV, "").strip()
        try:
            wait = float(raw) if raw else 0.0
        except ValueError as e:
            raise SeppError(
                f"{WAIT_ENV}={raw!r} is not a number of seconds: fix or unset it"
            ) from e
    if wait < 0:
        raise SeppError(f"gpu_wait_s must be >= 0 seconds, got {wait:g}")
    return wait


def cluster_gpus() -> int:
    """GPUs the cluster has now (alive nodes), 0 on a CPU cluster."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def _request(bundles: list[dict[str, float]]) -> None:
    """One place that talks to the autoscaler (a test replaces it to see the request)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def ensure_gpus(
    needed: int,
    wait_s: float,
    *,
    what: str,
    fix: str,
    cpus_per_gpu: float = 1.0,
) -> int:
    """Make sure the cluster has ``needed`` GPUs; returns the GPUs it has.

    Short of them with ``wait_s > 0``: ask the autoscaler for ``needed`` bundles of one GPU and
    ``cpus_per_gpu`` CPUs (bundles, not a bare GPU count, so it launches nodes whose CPUs fit
    the actors too), poll until they are there or the time is up, then withdraw the request
    (idle nodes may go again). Still short: SeppError naming ``fix`` (the stage's own option
    that lowers the need), the nodes' min_workers and gpu_wait_s.
    """
    have = cluster_gpus()
    if needed <= 0 or have >= needed:
        return have
    if wait_s > 0:
        _request([{"GPU": 1, "CPU": cpus_per_gpu}] * needed)
        log.warning("%s: waiting up to %.0f s for %d GPUs (have %d)", what, wait_s, needed, have)
        deadline = time.monotonic() + wait_s
        try:
            while have < needed and time.monotonic() < deadline:
                time.sleep(min(POLL_S, max(0.1, deadline - time.monotonic())))
                have = cluster_gpus()
        finally:
            _request([])  # the request has served (or failed): withdraw it
    if have < needed:
        waited = f" after waiting {wait_s:.0f} s" if wait_s > 0 else ""
        raise SeppError(
            f"{needed} {what} asked for, the cluster has {have} GPUs{waited}: {fix}, raise "
            f"the GPU nodes' min_workers, or set gpu_wait_s on an autoscaling cluster "
            f"({WAIT_ENV} for every stage)"
        )
    return have


def stage_gpus(
    count: int | None,
    wait_s: float,
    *,
    what: str,
    fix: str,
    cpus_per_gpu: float = 1.0,
) -> int:
    """GPUs a stage that runs one actor per GPU will find: 0 on a CPU cluster not told to wait
    (the stage then runs on CPUs, as on a laptop); otherwise at least ``count`` (its explicit
    actor or worker count), or one GPU when ``count`` is None, ensured by :func:`ensure_gpus`.
    The stage then sizes itself on the GPUs present, as before."""
    if cluster_gpus() == 0 and wait_s <= 0:
        return 0
    return ensure_gpus(count or 1, wait_s, what=what, fix=fix, cpus_per_gpu=cpus_per_gpu)
