"""The bodies of ``equi deploy`` and ``equi server start | status | stop`` (the commands are in :mod:`flows.cli`).

Errors are raised (ServerError, ConfigError, InvalidInputError) for the CLI's guard to print as one line; the
functions return the command's exit code otherwise.
"""

from __future__ import annotations

import json
import shlex
import signal
from pathlib import Path

from rich.console import Console

from flows import prefect_server as S


# ------------------------------------------------------------------------------------------------ equi server
def server_start(console: Console, results_dir: str, port: int | None) -> int:
    info, started = S.start_server(results_dir, port)
    verb = "started" if started else "already running"
    console.print(
        f"Prefect server {verb}: {info.api_url} (pid {info.pid}; UI {info.api_url.removesuffix('/api')}; "
        f"PREFECT_HOME {info.prefect_home}; log {info.log}). `equi deploy CONFIG` uses it for configs whose "
        f"results_dir is {results_dir}; `equi server stop -r {results_dir}` stops it.",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def server_status(console: Console, results_dir: str, as_json: bool) -> int:
    """0 when the server runs and answers, 1 otherwise (like a service manager's status)."""
    info = S.running_server(results_dir)
    why = S.api_error(info.api_url) if info else None
    if as_json:
        state = "stopped" if info is None else ("running" if why is None else "not answering")
        doc = {"state": state, "error": why, **({} if info is None else info.__dict__)}
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
    return 0 if info is not None and why is None else 1


def server_stop(console: Console, results_dir: str) -> int:
    info = S.stop_server(results_dir)
    if info is None:
        console.print(f"no Prefect server running for {results_dir}", highlight=False)
    else:
        console.print(f"stopped the Prefect server at {info.api_url} (pid {info.pid})", highlight=False)
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
