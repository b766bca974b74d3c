"""The warm Dask cluster that ``equi server start`` keeps beside the results directory's Prefect server (issue #18):
a run that would start a local cluster of its own submits to it instead, and pays neither the workers' start (each
imports torch, the engine and Prefect) nor the cluster's close.

- The cluster's process (``python -m flows.warm_cluster``, started by :func:`flows.prefect_server.start_server` in a
  session of its own): a LocalCluster bound to 127.0.0.1, its workers set up as a run's own
  (:func:`flows.cluster_setup.local_cluster_kwargs`: engine preloaded, no ``MALLOC_TRIM_THRESHOLD_``, freed memory
  trimmed after every task, one thread each). It records itself for the server's state file
  (:class:`~flows.prefect_server.ClusterInfo`) and ends when the server's process does (or on ``equi server stop``).
- :func:`warm_cluster`: the run's side. The cluster is used only when its process lives, the scheduler that answers
  at its address (within the run's ``cluster.connect_timeout_s``) is the one recorded, and its workers compute what
  the run's own would (:func:`worker_context`: the same code, interpreter, working directory and engine
  environment); otherwise the run starts its own cluster, with one line saying why.

Workers keep state from run to run, all of it bounded: each caches the runtimes (model, dataset) of its last two
configs (:func:`tasks.runtime.get_runtime`, keyed by the whole config) and a few datasets' arrays, and hands the
memory a task freed back to the OS after every task (:mod:`flows.worker_preload`); a worker past Dask's memory
limit is restarted by its nanny. Every image's randomness is seeded from the config and the image, so what a
worker ran before changes no number, as within one run, where a worker runs many shards.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flows.cluster_setup import local_cluster_kwargs, torch_threads_for
from flows.prefect_server import (
    CLUSTER_LOG,
    HOST,
    ClusterInfo,
    ServerError,
    cluster_alive,
    process_exists,
    running_server,
)
from flows.scheduler_check import check_scheduler
from storage.atomic import atomic_write_json
from storage.keys import source_digest
from tasks.config import ConfigError, RunConfig
from tasks.config_checks import is_loopback

WORKER_PACKAGES = ("equicore", "storage", "tasks", "flows")  # the code a shard task runs
CLIENT_ONLY_ENV = ("EQUI_RESULTS_DIR", "EQUI_PREFECT_STARTUP_TIMEOUT_S")  # read by the command line, not by workers
WATCH_S = 1.0  # how often the cluster's process looks whether the server's process still runs


def worker_context() -> dict[str, Any]:
    """What a worker's results depend on besides the run's config: the code it runs (a digest of the sources), the
    interpreter, the working directory (relative paths in a config) and the engine's environment (``EQUI_*``:
    data root, ``--allow-outside-roots``, fault injection; ``CUDA_VISIBLE_DEVICES``)."""
    dirs = []
    for package in WORKER_PACKAGES:
        spec = importlib.util.find_spec(package)  # found, not imported: the engine imports torch
        dirs.append(Path(list(spec.submodule_search_locations or [])[0]))
    env = {
        k: v
        for k, v in sorted(os.environ.items())
        if (k.startswith("EQUI_") and k not in CLIENT_ONLY_ENV) or k == "CUDA_VISIBLE_DEVICES"
    }
    return {"code": source_digest(dirs), "python": sys.executable, "cwd": str(Path.cwd().resolve()), "env": env}


def context_difference(recorded: dict[str, Any], here: dict[str, Any]) -> str | None:
    """Why workers started with ``recorded`` would not compute what this process's own workers would (None: they
    would)."""
    if recorded.get("code") != here["code"]:
        return "the code changed since it started"
    if recorded.get("python") != here["python"]:
        return f"its workers run {recorded.get('python')}, this run {here['python']}"
    if recorded.get("cwd") != here["cwd"]:
        return f"it runs in {recorded.get('cwd')}, this run in {here['cwd']} (relative paths would differ)"
    theirs = recorded.get("env") or {}
    names = sorted(k for k in {*theirs, *here["env"]} if theirs.get(k) != here["env"].get(k))
    return f"{', '.join(names)} differ from its workers' environment" if names else None


def recorded_cluster(results_dir: str | os.PathLike[str]) -> ClusterInfo | None:
    """The warm cluster that the state file of the results directory's running ``equi server`` records, if any."""
    try:
        server = running_server(results_dir)
    except ServerError:  # an unreadable state file: the API choice already says so
        return None
    return server.cluster if server is not None else None


def warm_cluster(cfg: RunConfig) -> tuple[ClusterInfo | None, str | None]:
    """The warm cluster of the results directory's ``equi server`` when this run can use it, else (None, why not);
    why is None when there is none (no server, or one without workers)."""
    cluster = recorded_cluster(cfg.results_dir)
    if cluster is None:
        return None, None
    what = "the warm Dask cluster of `equi server` at"
    where = f"{what} {cluster.address}"
    restart = f"`equi server stop -r {cfg.results_dir}`, then `start`, to restart it"
    if not cluster_alive(cluster):
        return None, f"{where} is gone (pid {cluster.pid}; log {cluster.log}; {restart})"
    if not is_loopback(urlsplit(cluster.address).hostname or ""):
        return None, f"{where} is not on a loopback interface: not used"
    if cfg.model.factory:
        return None, f"{where} is not used for a model.factory (its workers would keep the factory's modules)"
    if why := context_difference(cluster.context, worker_context()):
        return None, f"{where} is not used: {why} ({restart})"
    try:
        identity = check_scheduler(cluster.address, cfg.cluster.connect_timeout_s, what)
    except ConfigError as e:
        return None, str(e)
    if identity.get("id") != cluster.scheduler_id:
        return None, f"{where}: another scheduler answers there"
    if not identity.get("n_workers"):
        return None, f"{where} has no worker left ({restart})"
    return cluster, None


# ------------------------------------------------------------------------------------------------ the process
def serve(server_pid: int, workers: int, gpus: int, ready: Path) -> None:
    """Start the cluster, record it in ``ready`` (atomically: the server's start waits for the file), and keep it
    until the server's process is gone."""
    from distributed import LocalCluster

    from flows.dask_shutdown import quiet_cluster_workers

    with LocalCluster(**local_cluster_kwargs(workers, 1, HOST, False, gpus)) as cluster:
        info = ClusterInfo(
            address=cluster.scheduler_address,
            pid=os.getpid(),
            scheduler_id=cluster.scheduler_info["id"],
            workers=workers,
            gpus=gpus,
            torch_threads=torch_threads_for(workers),
            log=str((ready.parent / CLUSTER_LOG).resolve()),
            context=worker_context(),
        )
        atomic_write_json(ready, asdict(info))
        while process_exists(server_pid):
            time.sleep(WATCH_S)
        quiet_cluster_workers(cluster)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="the warm Dask cluster of `equi server start --workers N`")
    p.add_argument(
        "--server-pid", type=int, required=True, help="the Prefect server's process: the cluster ends with it"
    )
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--gpus", type=int, default=0, help="GPUs the workers share out, one each")
    p.add_argument("--ready", type=Path, required=True, help="where to record the cluster once its workers run")
    args = p.parse_args(argv)
    serve(args.server_pid, args.workers, args.gpus, args.ready)


if __name__ == "__main__":
    main()
