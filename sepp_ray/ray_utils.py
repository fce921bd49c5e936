"""Connecting to Ray: the only place the library decides which cluster it runs on."""

from __future__ import annotations

import logging
import os
from typing import Any


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS (a `ray job submit` or `ray start` cluster), or start a
    local one. A no-op when Ray is already initialised (tests share one session cluster)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address is None:
        kwargs["include_dashboard"] = False
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    ray.init(address=address, **kwargs)
