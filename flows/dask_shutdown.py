"""A quiet end for the local Dask cluster a run starts itself.

When a run is done, its LocalCluster closes the scheduler; a worker whose periodic heartbeat is in flight at that
moment logs ``Failed to communicate with scheduler during heartbeat.`` at ERROR level with a full traceback
(distributed/worker.py), which lands on the terminal after a successful run. Once every task's result is in, the
runner below asks each worker of its own cluster to drop exactly that record; every other record, at every level
the user asked for, still prints. Schedulers the user runs (``equi run --cluster``) are not closed by a run, and
their workers are left as they are.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from prefect_dask import DaskTaskRunner

HEARTBEAT_FAILURE = "Failed to communicate with scheduler during heartbeat"
WORKER_LOGGER = "distributed.worker"


class ShutdownNoiseFilter(logging.Filter):
    """Drops the heartbeat failure a closing scheduler causes; lets everything else through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HEARTBEAT_FAILURE)


def quiet_shutdown_logs() -> None:
    """Install :class:`ShutdownNoiseFilter` on this process's Dask worker logger (once)."""
    logger = logging.getLogger(WORKER_LOGGER)
    if not any(isinstance(f, ShutdownNoiseFilter) for f in logger.filters):
        logger.addFilter(ShutdownNoiseFilter())


class LocalDaskTaskRunner(DaskTaskRunner):
    """prefect-dask's runner on a LocalCluster it starts; its workers go quiet about heartbeats before it closes."""

    def __exit__(self, *args: Any) -> None:
        client = getattr(self, "_client", None)
        if client is not None and not self.address:
            with contextlib.suppress(Exception):  # a worker that is already gone has nothing left to print
                client.run(quiet_shutdown_logs)
        super().__exit__(*args)


def quiet_cluster_workers(cluster: Any) -> None:
    """The same for a LocalCluster held directly (``equi demo`` shares one among runs), just before it closes."""
    from distributed import Client

    with contextlib.suppress(Exception), Client(cluster, set_as_default=False) as client:
        client.run(quiet_shutdown_logs)
