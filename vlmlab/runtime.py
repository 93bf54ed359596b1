"""Connecting to Ray: one :func:`start_ray` for every verb, job and Serve app.

A verb run on a laptop starts an embedded local Ray (no dashboard: it only slows start-up); under
``ray job submit`` or with ``--address`` / ``RAY_ADDRESS`` it joins that cluster.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def start_ray(address: str | None = None, namespace: str | None = None, **local_options: Any) -> None:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start an embedded local one.

    Does nothing when Ray is already initialised in this process (a test's or a notebook's Ray).
    ``local_options`` (e.g. ``num_cpus``) apply only when a local Ray is started.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    options: dict[str, Any] = {"namespace": namespace, "log_to_driver": True, "configure_logging": False}
    if address is None:
        # "local": a new embedded instance, never whichever other Ray happens to run on this machine
        options.update({"include_dashboard": False, **local_options})
    ray.init(address=address or "local", **options)
    log.info("Ray %s: %s", "joined" if address else "started locally", ray.get_runtime_context().gcs_address)
