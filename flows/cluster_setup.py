"""How this project's local Dask clusters are set up: a run's own, the one ``equi demo`` shares among runs, and the
warm one ``equi server start`` keeps (:mod:`flows.warm_cluster`). A light module (torch only when a GPU count is
asked for), imported by the start-up before the engine.
"""

from __future__ import annotations

import os
from typing import Any

# A task on a worker that dies (SIGKILL, OOM, preemption) is rescheduled on another worker up to this many times
# before Dask gives up on it (KilledWorker); set explicitly so a user's Dask config of 0 cannot turn it off.
ALLOWED_WORKER_DEATHS = 3
# Imported by every local worker as it starts (torch, the engine, the task wrappers): the first task does not wait.
WORKER_PRELOAD = ["flows.worker_preload"]
# Starts the workers without Dask's MALLOC_TRIM_THRESHOLD_, which halves torch's CPU speed (see the module).
WORKER_NANNY = "flows.dask_nanny.TorchNanny"


def machine_workers(n_workers: int | None, cuda: bool = True) -> tuple[int, int]:
    """(workers, GPUs) of a local cluster: ``n_workers`` when given, else one per GPU, else one per core."""
    import torch

    gpus = torch.cuda.device_count() if cuda else 0
    return n_workers or (gpus or (os.cpu_count() or 1)), gpus


def torch_threads_for(n_workers: int) -> int:
    """Torch threads per worker: the cores shared out among the workers."""
    return max(1, (os.cpu_count() or 1) // max(1, n_workers))


def local_cluster_kwargs(n_workers: int, threads_per_worker: int, host: str, dashboard: bool, gpus: int) -> dict:
    """LocalCluster's arguments for every local cluster of the project."""
    kwargs: dict[str, Any] = {
        "n_workers": n_workers,
        "threads_per_worker": threads_per_worker,
        "processes": True,
        "host": host,
        "dashboard_address": (f"[{host}]:8787" if ":" in host else f"{host}:8787") if dashboard else None,
        "preload": list(WORKER_PRELOAD),
        "worker_class": WORKER_NANNY,
        # Not left to Dask's config: an EarlyCluster's scheduler is created in another thread than the run's settings.
        "scheduler_kwargs": {"allowed_failures": ALLOWED_WORKER_DEATHS},
    }
    if gpus:
        kwargs["resources"] = {"GPU": 1}
    return kwargs
