"""The nanny of this project's local Dask workers (``LocalCluster(worker_class=...)``, see
:func:`flows.cluster_setup.local_cluster_kwargs`).

Dask starts worker processes with ``MALLOC_TRIM_THRESHOLD_=65536`` (``distributed.nanny.pre-spawn-environ``), so that
workers hand freed memory back to the OS. Setting that variable also switches off glibc's dynamic mmap threshold: it
stays at 128 KiB, every larger buffer becomes a fresh ``mmap`` (page faults, zeroed pages) and is unmapped when freed.
Torch's CPU work allocates such buffers all the time; one defense shard of the fashion demo took 7.5 s in a worker
against 3.5 s in process (4.4 s without the variable, on the same shared 2-core machine). The workers here go without
it; a value the user exports still reaches them (it is inherited like any other variable).
"""

from __future__ import annotations

import os
from typing import Any

from distributed import Nanny

TRIM = "MALLOC_TRIM_THRESHOLD_"


class TorchNanny(Nanny):
    """Dask's Nanny, whose worker processes start without Dask's ``MALLOC_TRIM_THRESHOLD_`` default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if TRIM not in os.environ:  # Dask's default, not the user's choice
            self.pre_spawn_env.pop(TRIM, None)
            self.env.pop(TRIM, None)
