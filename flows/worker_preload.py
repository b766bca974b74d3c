"""What every local Dask worker imports when it starts (Dask's ``preload``, see
:func:`flows.cluster_setup.local_cluster_kwargs`), so that its first task does not pay for it: torch, the engine, the
shard steps and the Prefect task wrappers (with Prefect's task engine). A worker of a cluster started ahead of the
flow imports them while this process still loads the model and waits for the Prefect API.

Each worker also hands the memory its tasks freed back to the OS after every task (``malloc_trim``): the workers run
without Dask's ``MALLOC_TRIM_THRESHOLD_`` (:mod:`flows.dask_nanny`, which doubles torch's CPU speed), so glibc would
otherwise keep a finished shard's buffers mapped until the worker ends.

Workers of a scheduler the user runs (``--cluster``) can do the same: ``dask worker ADDRESS --preload
flows.worker_preload``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from typing import Any

import prefect.task_engine  # noqa: F401  (what runs each submitted task)
import torch  # noqa: F401
from distributed import WorkerPlugin

import equicore  # noqa: F401  (registrations)
import flows.prefect_tasks  # noqa: F401  (the tasks themselves; imports prefect, tasks.runtime)
import tasks.shard_steps  # noqa: F401

PRELOADED = ("torch", "equicore", "tasks.shard_steps", "flows.prefect_tasks")


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class TrimAfterTask(WorkerPlugin):
    """Returns the heap's free pages to the OS each time a task ends (a few ms; the next task maps what it needs)."""

    name = "equirobust-trim-after-task"

    def __init__(self, trim: Callable[[int], int]) -> None:
        self.trim = trim

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if start == "executing":
            self.trim(0)


async def dask_setup(worker: Any) -> None:  # Dask's preload hook
    # What was imported lives as long as the process: keep it out of every later garbage collection.
    gc.freeze()
    if (trim := malloc_trim()) is not None:
        await worker.plugin_add(TrimAfterTask(trim), name=TrimAfterTask.name)


def dask_teardown(worker: Any) -> None:  # noqa: ARG001
    # A closing worker's interpreter would otherwise spend seconds collecting torch's objects on exit, past the
    # nanny's 4 s grace period (it then kills the process): freezing them lets the process end at once.
    gc.freeze()
