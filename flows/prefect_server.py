"""A local Prefect server that keeps schedules: ``equi server start | status | stop`` and ``equi deploy``.

Prefect's temporary (ephemeral) API, which ``equi run`` uses, lives only as long as one command, so it cannot hold
a schedule: a deployment needs a server that runs the scheduler service. This module starts ``prefect server
start`` as a background process of its own session (so a Ctrl-C in the terminal does not reach it), bound to
127.0.0.1 only, on a free port (or ``--port``), with its own ``PREFECT_HOME`` — database, logs — under
``<results_dir>/prefect/``, next to the results it describes. A state file there (``server.json``: pid, host,
port, API URL) lets ``equi deploy`` find the server the project started earlier; ``equi server stop`` stops the
process group and removes the file. A state file whose process is gone, or that another host wrote, is stale and
ignored.

With ``--workers N`` (``equi server start``'s default: a run's own default size), a warm local Dask cluster starts
beside it (:mod:`flows.warm_cluster`: its own process and session, bound to 127.0.0.1, workers set up as a run's
own), and the state file records it (:class:`ClusterInfo`); runs of the results directory use it instead of
starting a cluster. It stops with ``equi server stop``, and by itself when the server's process is gone.

Errors are :class:`ServerError` with a one-line message, for the CLI to print.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from equicore.errors import EquirobustError
from storage.atomic import atomic_write_json

HOST = "127.0.0.1"  # never 0.0.0.0: the API has no authentication
STATE_FILE = "server.json"
LOG_FILE = "server.log"
CLUSTER_LOG = "cluster.log"
CLUSTER_READY = "cluster.ready.json"  # the warm cluster's process writes its ClusterInfo here once its workers run
CLUSTER_MODULE = "flows.warm_cluster"
STARTUP_TIMEOUT_S = float(os.environ.get("EQUI_PREFECT_STARTUP_TIMEOUT_S", "180"))  # a loaded machine is slow
STOP_TIMEOUT_S = 30.0
_CLIENT_SETTINGS = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE")


class ServerError(EquirobustError):
    """The Prefect server cannot be started, found or reached (one line, for the CLI)."""


@dataclass(frozen=True)
class ClusterInfo:
    """The warm Dask cluster the server keeps (:mod:`flows.warm_cluster`), as its process recorded it."""

    address: str  # its scheduler, on 127.0.0.1
    pid: int  # the process that owns the scheduler and the workers' nannies (a session of its own)
    scheduler_id: str  # a run checks that the scheduler answering at ``address`` is this one
    workers: int
    gpus: int
    torch_threads: int  # per worker, as a run's own cluster of that size would have
    log: str
    context: dict[str, Any]  # what the workers' results depend on besides a run's config (flows.warm_cluster)


@dataclass(frozen=True)
class ServerInfo:
    pid: int
    host: str  # the machine that started it (the API listens on its loopback interface only)
    port: int
    api_url: str
    prefect_home: str
    log: str
    started_at: str
    started_by: str  # "equi server start" or "equi deploy" (a server deploy stops when it stops)
    cluster: ClusterInfo | None = None  # the warm Dask cluster (`equi server start --workers N`)


def server_dir(results_dir: str | os.PathLike[str]) -> Path:
    """Where the server of a results directory keeps its state, PREFECT_HOME and log."""
    return Path(results_dir) / "prefect"


# ------------------------------------------------------------------------------------------------ checks
def api_error(api_url: str, timeout_s: float = 5.0) -> str | None:
    """None when a Prefect API answers ``GET {api_url}/health``; else why not, in a few words."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as resp:  # noqa: S310
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return str(reason) or type(reason).__name__


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def check_port(port: int) -> None:
    """ServerError when ``port`` cannot be bound on 127.0.0.1 (in use, or privileged)."""
    if not 1 <= port <= 65535:
        raise ServerError(f"--port: expected 1..65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise ServerError(
                f"--port {port}: cannot listen on {HOST}:{port} ({e.strerror or e}); pick another port, or omit "
                "--port for a free one"
            ) from None


def _alive(pid: int, marker: bytes = b"prefect") -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the pid
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # a reused pid is not our server
        with contextlib.suppress(OSError):
            return marker in cmdline.read_bytes()
    return True


# ------------------------------------------------------------------------------------------------ state
def read_state(results_dir: str | os.PathLike[str]) -> ServerInfo | None:
    path = server_dir(results_dir) / STATE_FILE
    try:
        data = json.loads(path.read_text())
        cluster = data.get("cluster")
        fields = {k: data[k] for k in ServerInfo.__dataclass_fields__ if k != "cluster"}
        return ServerInfo(**fields, cluster=ClusterInfo(**cluster) if cluster else None)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ServerError(f"{path}: unreadable server state ({type(e).__name__}); remove it") from None


def running_server(results_dir: str | os.PathLike[str]) -> ServerInfo | None:
    """The server this results directory's state file names, if its process is alive on this machine."""
    info = read_state(results_dir)
    if info is None or info.host != socket.gethostname() or not _alive(info.pid):
        return None
    return info


def cluster_alive(cluster: ClusterInfo) -> bool:
    """Whether the warm cluster's process still runs (it may have died while the server lives)."""
    return _alive(cluster.pid, CLUSTER_MODULE.encode())


@contextlib.contextmanager
def _state_lock(directory: Path) -> Iterator[None]:
    """One start or stop at a time per results directory (two `equi deploy --start-server` would race)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".server.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ start / stop
def start_server(
    results_dir: str | os.PathLike[str],
    port: int | None = None,
    *,
    started_by: str = "equi server start",
    timeout_s: float = STARTUP_TIMEOUT_S,
    workers: int = 0,
    gpus: int = 0,
) -> tuple[ServerInfo, bool]:
    """Start the results directory's server, or find it running: (info, started now?). ``workers`` > 0: with a warm
    Dask cluster of that many workers (``gpus``: the GPUs they share out, one each), started at the same time."""
    directory = server_dir(results_dir)
    with _state_lock(directory):
        if (info := running_server(results_dir)) is not None:
            if port is not None and port != info.port:
                raise ServerError(
                    f"a Prefect server for {results_dir} already runs on port {info.port} (pid {info.pid}); "
                    f"`equi server stop -r {results_dir}` first to move it to port {port}"
                )
            return info, False
        if port is None:
            port = free_port()
        else:
            check_port(port)
        home = directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        log = directory / LOG_FILE
        # It serves an API, it does not use one; its own PREFECT_HOME also keeps the user's profiles out of it.
        env = {k: v for k, v in os.environ.items() if k not in _CLIENT_SETTINGS}
        env.update(
            PREFECT_HOME=str(home.resolve()),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",  # offline machines: no telemetry attempts
            PREFECT_SERVER_API_HOST=HOST,
            PREFECT_SERVER_API_PORT=str(port),
        )
        api_url = f"http://{HOST}:{port}/api"
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
        with open(log, "ab") as out:
            out.write(f"\n--- {_now()}: {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(  # noqa: S603
                [*cmd, "--scheduler", "--analytics-off"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: a terminal's Ctrl-C does not reach it
                cwd=str(directory),
            )
        cluster_proc = _launch_cluster(directory, api_url, proc.pid, workers, gpus) if workers else None
        try:
            _wait_for(proc, lambda: api_error(api_url, timeout_s=2.0) is None, "the Prefect server", log, timeout_s)
            cluster = _wait_for_cluster(cluster_proc, directory, timeout_s) if cluster_proc else None
        except BaseException:
            for started in (cluster_proc, proc):
                if started is not None:
                    _stop_group(started.pid)
            raise
        info = ServerInfo(
            pid=proc.pid,
            host=socket.gethostname(),
            port=port,
            api_url=api_url,
            prefect_home=str(home.resolve()),
            log=str(log.resolve()),
            started_at=_now(),
            started_by=started_by,
            cluster=cluster,
        )
        atomic_write_json(directory / STATE_FILE, asdict(info))
        return info, True


def stop_server(results_dir: str | os.PathLike[str], *, only_pid: int | None = None) -> ServerInfo | None:
    """Stop the results directory's server (SIGTERM to its process group, SIGKILL after 30 s; its warm cluster
    first) and remove its state file; the one stopped, or None when none was running. ``only_pid``: stop it only if
    it is that process."""
    directory = server_dir(results_dir)
    with _state_lock(directory):
        info = running_server(results_dir)
        if only_pid is not None and (info is None or info.pid != only_pid):
            return None
        if info is not None:
            if info.cluster is not None and cluster_alive(info.cluster):
                _stop_group(info.cluster.pid)
            _stop_group(info.pid)
        with contextlib.suppress(FileNotFoundError):
            (directory / STATE_FILE).unlink()
        return info


def _stop_group(pid: int) -> None:
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our child (started by this process)
            if not process_exists(pid):
                return
            time.sleep(0.1)


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return status.read_text().split(") ")[1][0] != "Z"  # a zombie is gone
    return True


def _launch_cluster(directory: Path, api_url: str, server_pid: int, workers: int, gpus: int) -> subprocess.Popen:
    """The warm cluster's process (:mod:`flows.warm_cluster`), in this working directory and environment (those a
    run's own workers would inherit from a run started here), its workers reporting to the server's API."""
    (directory / CLUSTER_READY).unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_SETTINGS}
    env.update(PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # As a run's own workers (`equi run` without --verbose): a log of warnings and errors, not a line per task.
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    env.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    cmd = [sys.executable, "-m", CLUSTER_MODULE, "--server-pid", str(server_pid), "--workers", str(workers)]
    cmd += ["--gpus", str(gpus), "--ready", str((directory / CLUSTER_READY).resolve())]
    with open(directory / CLUSTER_LOG, "ab") as out:
        out.write(f"\n--- {_now()}: {' '.join(cmd)}\n".encode())
        out.flush()
        return subprocess.Popen(  # noqa: S603  (our interpreter, fixed arguments)
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _wait_for_cluster(proc: subprocess.Popen, directory: Path, timeout_s: float) -> ClusterInfo:
    ready = directory / CLUSTER_READY
    _wait_for(proc, ready.exists, "the warm Dask cluster", directory / CLUSTER_LOG, timeout_s)
    info = ClusterInfo(**json.loads(ready.read_text()))
    ready.unlink()
    return info


def _wait_for(proc: subprocess.Popen, is_up: Callable[[], bool], what: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"{what} exited during startup (exit code {proc.returncode}): {_last_line(log)} (log: {log})"
            )
        if is_up():
            return
        time.sleep(0.5)
    raise ServerError(
        f"{what} did not start within {timeout_s:g} s (raise EQUI_PREFECT_STARTUP_TIMEOUT_S on a slow machine; "
        f"log: {log})"
    )


def _last_line(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1][:300]
    return "no output"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
