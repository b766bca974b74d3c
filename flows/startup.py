"""Start-up of a Prefect + Dask run, kept off the critical path (issue #18), and the rule that lets a small run skip
the cluster. A light module (no torch, no Prefect at import): ``equi run`` begins the start-up before it imports the
engine.

- :class:`Launch`: as the run begins, the Prefect API is chosen and a temporary one launched in the background
  (:mod:`flows.prefect_api`; waited for only when the flow starts); once the run has passed its checks, the local
  cluster starts when the run will surely use one.
- :class:`EarlyCluster`: the LocalCluster starts in a background thread while this process plans, imports Prefect
  and waits for the API; its workers import torch and the engine as they start (:mod:`flows.worker_preload`). The
  flow's task runner takes the running cluster.
- :func:`small_run_reason`: when neither the config nor a flag chose where the run executes, a run that a cluster
  could not make faster runs in this process instead (README, "Where a run executes").
- The warm cluster: when neither chose it either and the run uses the results directory's ``equi server``, the run
  submits to the Dask cluster that server keeps (:mod:`flows.warm_cluster`) as it would to ``--cluster ADDRESS``,
  and leaves it running.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from flows.cluster_setup import local_cluster_kwargs, machine_workers
from flows.prefect_api import EQUI_SERVER, ApiChoice, RunApi, choose_api, open_api
from flows.prefect_server import ClusterInfo
from flows.progress import phase
from flows.warm_cluster import warm_cluster
from tasks.config import LOCALHOST, ClusterConfig, RunConfig

# The cluster fields that choose where a run executes, or shape a local cluster: any of them away from its default
# means the user asked for that, and the automatic choice stays out of the way.
CHOICE_FIELDS = ("in_process", "address", "n_workers", "threads_per_worker", "host", "dashboard", "gpu_resources")


def chosen_by_user(cluster: ClusterConfig) -> bool:
    """Whether the config or a flag (``--workers``, ``--cluster``, ``--in-process``, ``--listen``) chose how the run
    executes; with nothing chosen, :func:`small_run_reason` may run it in process."""
    default = ClusterConfig()
    return any(getattr(cluster, f) != getattr(default, f) for f in CHOICE_FIELDS)


def small_run_reason(cluster: ClusterConfig, n_workers: int, n_units: int | None, keeps_runs: bool) -> str | None:
    """Why this run executes in process although its config leaves the choice open (None: on a local cluster).

    The rule: with nothing chosen (:func:`chosen_by_user`) and no Prefect server that keeps runs in use (a
    ``PREFECT_API_URL`` or the results directory's ``equi server``: its UI should show the run), a run executes in
    process when a local cluster cannot run two units at once: it would have one worker, or the plan has at most one
    unit to compute. Starting the cluster (worker processes that import torch, a temporary Prefect API) would then
    only add start-up time. ``n_units`` is None before planning (only the worker count is judged then).
    Tables are identical either way.
    """
    if chosen_by_user(cluster) or keeps_runs:
        return None
    if n_workers <= 1:
        return "a local cluster would have one worker, which runs the shards one after another as this process does"
    if n_units is not None and n_units <= 1:
        return f"{n_units} unit-shard to compute: nothing for a cluster to run in parallel"
    return None


def default_workers(cfg: RunConfig) -> tuple[int, int]:
    """(workers, GPUs) of the run's local cluster: one worker per GPU, else one per core (each single-threaded)."""
    return machine_workers(cfg.cluster.n_workers, cfg.device in ("auto", "cuda"))


def run_cluster_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """The LocalCluster of a run on its own cluster (not ``--cluster``)."""
    n_workers, gpus = default_workers(cfg)
    c = cfg.cluster
    return local_cluster_kwargs(n_workers, c.threads_per_worker, c.host, c.dashboard, gpus)


def on_scheduler(cfg: RunConfig, address: str, torch_threads: int | None, gpus: bool) -> RunConfig:
    """``cfg`` submitted to the scheduler at ``address`` (a cluster shared by several runs, or the warm one), each
    task on ``torch_threads`` threads and, with ``gpus``, a GPU of its own; what it computes (its run id) is the
    same."""
    data = cfg.model_dump(mode="json")
    local = {"n_workers": None, "dashboard": False, "host": LOCALHOST}  # sized and bound by that cluster
    data["cluster"].update(address=address, torch_threads=torch_threads, gpu_resources=gpus, **local)
    return RunConfig.model_validate(data)


def known_worker_count(cfg: RunConfig) -> int | None:
    """The local cluster's worker count when it is known without importing torch for it: given, a CPU run, or torch
    already loaded; else None."""
    if cfg.cluster.n_workers:
        return cfg.cluster.n_workers
    if cfg.device == "cpu":
        return os.cpu_count() or 1
    return default_workers(cfg)[0] if "torch" in sys.modules else None


def units_hint(cfg: RunConfig) -> int | None:
    """How many units a run will compute, as far as its manifest tells without the engine or planning (None:
    unknown), to start its cluster before planning: a new run at least one per (attack, defense) pair; a complete
    run most likely none (a rerun plans nothing unless a file was damaged); a failed run its failed units; an
    interrupted one is unknown. A wrong guess costs time, never a result: the plan decides what runs."""
    from storage.run_store import RunStore

    store = RunStore(cfg.results_dir, cfg.run_id())
    try:
        manifest = store.read_manifest()
    except Exception:  # noqa: BLE001  (no manifest: a new run; unreadable: planning will say)
        return len(cfg.attacks) * len(cfg.defenses)
    status = manifest.get("status")
    if status == "complete":
        return 0
    if status == "failed":
        return int(manifest.get("failed_units") or 0)
    return None


def _start_local_cluster(kwargs: dict[str, Any]) -> Any:
    from distributed import LocalCluster

    return LocalCluster(**kwargs)


class EarlyCluster:
    """A LocalCluster started in a background thread ahead of the flow.

    :meth:`take` is the ``cluster_class`` of the flow's DaskTaskRunner: the runner calls it with the same kwargs and
    gets the running cluster (waiting for it if it is still starting), and closes it when the flow ends. A cluster the
    flow never took (an error before it, a run that went in process) is closed by :meth:`close_unused`.
    """

    def __init__(self, kwargs: dict[str, Any]) -> None:
        import distributed.deploy.local  # noqa: F401  (here: two threads importing one package can deadlock)

        self.kwargs = dict(kwargs)
        self._lock = threading.Lock()
        self._taken = False
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="equi-cluster-start")
        self._future: Future | None = self._pool.submit(_start_local_cluster, self.kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # Prefect sends the flow's context, its task runner included, along with each task: a copy there has no
        # cluster to hand over (and locks and threads do not travel).
        return {"kwargs": self.kwargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.kwargs = state["kwargs"]
        self._lock = threading.Lock()
        self._taken = True
        self._pool = self._future = None

    def _claim(self) -> bool:
        with self._lock:
            first, self._taken = not self._taken, True
        return first

    def take(self, **kwargs: Any) -> Any:
        if kwargs == self.kwargs and self._future is not None and self._claim():
            return self._future.result()
        return _start_local_cluster(kwargs)  # another flow with this runner: a cluster of its own, as before

    def close_unused(self) -> None:
        if self._claim() and self._future is not None:
            from flows.dask_shutdown import quiet_cluster_workers

            with contextlib.suppress(Exception):  # it failed to start: nothing to close
                cluster = self._future.result()
                quiet_cluster_workers(cluster)
                cluster.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class Launch:
    """A run's start-up, begun as early as possible (``with Launch(cfg) as launch``; ``equi run`` does it before
    importing the engine): the Prefect API is chosen, and a temporary one launched in the background. The pipeline
    starts the local cluster once the run has passed its checks (:meth:`start_cluster`); then
    :func:`flows.execution.execute` decides where the plan runs (:meth:`small_run_reason`), and waits for the API
    only as the flow begins. Leaving the block stops whatever still runs. A run that goes to the warm cluster of
    ``equi server`` runs :attr:`cfg`, which names that cluster's scheduler."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.choice: ApiChoice | None = None
        self.api: RunApi | None = None
        self.hint: int | None = None  # units the run will compute, as its manifest tells (:func:`units_hint`)
        self.cluster: EarlyCluster | None = None  # started by start_cluster, when the run will surely need one
        self.warm: ClusterInfo | None = None  # the warm cluster of `equi server` the run submits to
        self.warm_note: str | None = None  # why that cluster is not used
        self._announced = False
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Launch:
        cfg = self.cfg
        if cfg.cluster.in_process:
            return self
        self.choice = choose_api(cfg.results_dir)
        if self.choice.source == EQUI_SERVER and not chosen_by_user(cfg.cluster):
            self.warm, self.warm_note = warm_cluster(cfg)
            if self.warm is not None:
                threads = cfg.cluster.torch_threads or self.warm.torch_threads
                self.cfg = cfg = on_scheduler(cfg, self.warm.address, threads, bool(self.warm.gpus))
        self.hint = units_hint(cfg)
        if self.hint == 0:
            return self  # most likely nothing to compute (:func:`flows.execution.execute` starts what a repair needs)
        workers = known_worker_count(cfg)
        if workers is not None and self.small_run_reason(workers, self.hint) is not None:
            return self  # the rule already says "in process": nothing to start
        # When the rule can only say so later (the worker count may need torch, the unit count the model), the API
        # launched now is stopped then, having cost some CPU in the background; so is it when the run fails its checks.
        self.open_api()
        return self

    def start_cluster(self) -> None:
        """Start the local cluster in the background once the run has passed its checks (model built, images
        decoded, lock taken: a run that fails them starts no worker), when it will surely use one; it starts while
        the run plans, imports Prefect and waits for the API."""
        cfg = self.cfg
        if self.cluster is not None or self.api is None or cfg.cluster.address is not None:
            return
        if self.small_run_reason(default_workers(cfg)[0], self.hint) is None:
            self.cluster = EarlyCluster(run_cluster_kwargs(cfg))
            self._stack.callback(self.cluster.close_unused)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def announce(self) -> None:
        """Say (once) which Prefect API the run uses, and whether it uses the warm cluster of ``equi server``,
        through the progress display."""
        if self._announced or self.api is None:
            return
        self._announced = True
        if self.choice is not None and self.choice.note:
            phase(f"{self.choice.note}: a temporary Prefect API instead")
        phase(self.api.describe())
        if self.warm is not None:
            phase(f"using the warm Dask cluster of `equi server`: {self.warm.workers} worker(s) at {self.warm.address}")
        elif self.warm_note:
            phase(f"{self.warm_note}; this run starts a local cluster of its own")

    def small_run_reason(self, n_workers: int, n_units: int | None) -> str | None:
        keeps_runs = self.choice is not None and self.choice.keeps_runs
        return small_run_reason(self.cfg.cluster, n_workers, n_units, keeps_runs)

    def open_api(self) -> RunApi:
        if self.api is None:
            self.choice = self.choice or choose_api(self.cfg.results_dir)
            self.api = self._stack.enter_context(open_api(self.choice))
        return self.api

    def close(self) -> None:
        """Restore the environment and stop a temporary API (at once when the flow ends, before the reduce)."""
        self._stack.close()
        self.api = None
        self.cluster = None
