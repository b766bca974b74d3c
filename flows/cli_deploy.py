"""The bodies of ``equi deploy`` and ``equi server start | status | stop`` (the commands are in :mod:`flows.cli`).

Errors are raised (ServerError, ConfigError, InvalidInputError) for the CLI's guard to print as one line; the
functions return the command's exit code otherwise.
"""

from __future__ import annotations

import json
import shlex
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from flows import prefect_server as S
from flows.cluster_setup import machine_workers
from flows.scheduler_check import check_scheduler
from tasks.config import MAX_WORKERS, ConfigError


# ------------------------------------------------------------------------------------------------ equi server
def server_start(console: Console, results_dir: str, port: int | None, workers: int | None = 0) -> int:
    """``workers``: of the warm Dask cluster (None: one per GPU, else one per core, as a run's own; 0: none)."""
    if workers is not None and not 0 <= workers <= MAX_WORKERS:
        raise S.ServerError(f"--workers: expected 0 (no warm cluster) to {MAX_WORKERS}, got {workers}")
    n, gpus = machine_workers(workers) if workers != 0 else (0, 0)
    info, started = S.start_server(results_dir, port, workers=n, gpus=gpus)
    verb = "started" if started else "already running"
    console.print(
        f"Prefect server {verb}: {info.api_url} (pid {info.pid}; UI {info.api_url.removesuffix('/api')}; "
        f"PREFECT_HOME {info.prefect_home}; log {info.log}). `equi deploy CONFIG` uses it for configs whose "
        f"results_dir is {results_dir}; `equi server stop -r {results_dir}` stops it.",
        highlight=False,
        soft_wrap=True,
    )
    console.print(_cluster_line(info.cluster, results_dir), highlight=False, soft_wrap=True)
    return 0


def _cluster_line(cluster: S.ClusterInfo | None, results_dir: str) -> str:
    """The warm Dask cluster of a server, and whether its scheduler answers."""
    if cluster is None:
        return f"no warm Dask cluster (a server started with --workers 0): runs of {results_dir} start their own"
    state = cluster_state(cluster)
    answer = f"{state['n_workers']} worker(s) connected" if state["error"] is None else f"NOT usable: {state['error']}"
    return (
        f"warm Dask cluster for the runs of {results_dir}: {cluster.address}, {cluster.workers} worker(s) started, "
        f"{answer}; pid {cluster.pid}; log {cluster.log}"
    )


def cluster_state(cluster: S.ClusterInfo) -> dict[str, Any]:
    """Whether the warm cluster's process lives and its scheduler answers (``error``), and its connected workers."""
    if not S.cluster_alive(cluster):
        return {"error": f"its process (pid {cluster.pid}) is gone", "n_workers": 0}
    try:
        identity = check_scheduler(cluster.address, 5.0, "its scheduler at")
    except ConfigError as e:
        return {"error": str(e), "n_workers": 0}
    return {"error": None, "n_workers": identity.get("n_workers", 0)}


def server_status(console: Console, results_dir: str, as_json: bool) -> int:
    """0 when the server runs and answers, 1 otherwise (like a service manager's status)."""
    info = S.running_server(results_dir)
    why = S.api_error(info.api_url) if info else None
    if as_json:
        state = "stopped" if info is None else ("running" if why is None else "not answering")
        doc: dict[str, Any] = {"state": state, "error": why, **({} if info is None else asdict(info))}
        if info is not None and info.cluster is not None:
            doc["cluster"] |= cluster_state(info.cluster)
        console.print_json(json.dumps(doc))
    elif info is None:
        stale = S.read_state(results_dir)
        where = f" (its state file names pid {stale.pid} on {stale.host}, which is gone)" if stale else ""
        console.print(f"no Prefect server running for {results_dir}{where}", highlight=False, soft_wrap=True)
    else:
        answer = "answering" if why is None else f"NOT answering ({why})"
        console.print(
            f"Prefect server running for {results_dir}: {info.api_url}, {answer}; pid {info.pid}, started "
            f"{info.started_at} by `{info.started_by}`; PREFECT_HOME {info.prefect_home}; log {info.log}",
            highlight=False,
            soft_wrap=True,
        )
        console.print(_cluster_line(info.cluster, results_dir), highlight=False, soft_wrap=True)
    return 0 if info is not None and why is None else 1


def server_stop(console: Console, results_dir: str) -> int:
    info = S.stop_server(results_dir)
    if info is None:
        console.print(f"no Prefect server running for {results_dir}", highlight=False)
    else:
        cluster = f" and its warm Dask cluster (pid {info.cluster.pid})" if info.cluster is not None else ""
        console.print(
            f"stopped the Prefect server at {info.api_url} (pid {info.pid}){cluster}", highlight=False, soft_wrap=True
        )
    return 0


# ------------------------------------------------------------------------------------------------ equi deploy
def deploy(
    console: Console,
    config: Path,
    cron: str,
    name: str | None,
    tz: str | None,
    start: bool,
    port: int | None,
    dry_run: bool,
    verbose: bool,
) -> int:
    """Validate, find (or start) a server, register and serve until Ctrl-C / SIGTERM: exit code 0 on either."""
    from flows import scheduled

    dep = scheduled.build_deployment(config, cron, name, tz)  # bad config / cron / time zone: before any server
    if port is not None and not start:
        raise S.ServerError("--port needs --start-server (`equi server start --port N` picks the port otherwise)")
    if dry_run:
        console.print_json(json.dumps(dep, default=str))
        return 0
    # SIGTERM (systemd, kill) stops serving the way Ctrl-C does, also while the server starts.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    owned: S.ServerInfo | None = None
    served = False
    again = " ".join(
        [f"equi deploy {shlex.quote(str(config))} --cron {shlex.quote(cron)}"]
        + ([f"--name {shlex.quote(name)}"] if name else [])
        + ([f"--timezone {shlex.quote(tz)}"] if tz else [])
    )
    try:
        api_url, owned = scheduled.resolve_server(dep["results_dir"], start=start, port=port, deploy_command=again)
        if owned is not None:
            console.print(
                f"started a Prefect server at {api_url} (pid {owned.pid}; log {owned.log})",
                highlight=False,
                soft_wrap=True,
            )
        nxt = f"; next run {dep['next_run']}" if dep["next_run"] else ""
        console.print(
            f"serving deployment '{scheduled.FLOW_NAME}/{dep['name']}' on {api_url}: schedule '{cron}' "
            f"({dep['timezone']}){nxt}; run id {dep['run_id']}. Ctrl-C stops it.",
            highlight=False,
            soft_wrap=True,
        )
        served = True
        scheduled.serve(config, cron, dep["name"], dep["timezone"], api_url, verbose=verbose)
    except KeyboardInterrupt:
        pass
    finally:
        if served:
            paused = "its schedule is paused until the next `equi deploy`"
            console.print(
                f"stopped serving '{scheduled.FLOW_NAME}/{dep['name']}' ({paused})", highlight=False, soft_wrap=True
            )
        if owned is not None:  # a server this command started stops with it; `equi server start` ones stay
            S.stop_server(dep["results_dir"], only_pid=owned.pid)
            console.print(f"stopped the Prefect server this command started (pid {owned.pid})", highlight=False)
    return 0


def _raise_keyboard_interrupt(signum, frame) -> None:  # noqa: ARG001
    raise KeyboardInterrupt
