"""Connecting to Ray (the only place the library decides which cluster it runs on) and getting
results back from it with the project's own errors intact."""

from __future__ import annotations

import logging
import os
from typing import Any

from sepp_ray.errors import SeppError

log = logging.getLogger(__name__)


def dashboard_missing() -> str | None:
    """Why Ray's dashboard cannot start in this Python (a package of ``ray[default]`` is not
    installed: a plain ``pip install ray``, or an image that ships only the core), or None.
    Ray decides the same way: by importing the module that imports the dashboard's packages."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def init_kwargs(address: str | None, num_cpus: int | None = None) -> dict[str, Any]:
    """The arguments of ``ray.init`` (besides the address) for a cluster of our own, or for
    joining ``address``."""
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address is not None:
        return kwargs
    missing = dashboard_missing()
    # the dashboard on localhost where its packages are present: Ray's State API (which Ray
    # Train's clean-up relies on) needs it, and users watch the run there; a busy port moves
    # to the next free one. Asked for without them, Ray would fail to start.
    kwargs["include_dashboard"] = missing is None
    if missing is None:
        kwargs["dashboard_host"] = "127.0.0.1"
    else:
        log.warning("Ray dashboard off: %s (pip install 'ray[default]' to have it)", missing)
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    return kwargs


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (a `ray job submit` or `ray start` cluster), or start a
    local one. A no-op when Ray is already initialised (tests share one session cluster)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    # "local": a new cluster of our own, never a stranger's that `ray.init()` would join when
    # one runs on this machine (its shutdown would take this run down with it)
    ctx = ray.init(address=address or "local", **init_kwargs(address, num_cpus))
    if address is None and ctx.dashboard_url:
        from sepp_ray.console import say

        say(f"Ray dashboard: http://{ctx.dashboard_url}")


def ray_get(refs: Any, *, lost: tuple[str, str] | None = None) -> Any:
    """``ray.get(refs)``, with a SeppError raised inside a task or actor surfacing as itself (its
    message and exit status 2), not wrapped in a RayTaskError with a remote traceback.

    ``lost``: (who, fix) for a dead actor, e.g. ("a search actor", "Give it more memory"):
    Ray's error then becomes a SeppError "<who> died: <error>. <fix>"; without it, Ray's error
    is raised as is.
    """
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, SeppError):
            raise SeppError(str(cause)) from None
        raise
    except ray.exceptions.RayActorError as e:
        if lost is None:
            raise
        raise SeppError(f"{lost[0]} died: {e}. {lost[1]}") from e
