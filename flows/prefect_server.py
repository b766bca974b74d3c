"""A local Prefect server that keeps schedules: ``equi server start | status | stop`` and ``equi deploy``.

Prefect's temporary (ephemeral) API, which ``equi run`` uses, lives only as long as one command, so it cannot hold
a schedule: a deployment needs a server that runs the scheduler service. This module starts ``prefect server
start`` as a background process of its own session (so a Ctrl-C in the terminal does not reach it), bound to
127.0.0.1 only, on a free port (or ``--port``), with its own ``PREFECT_HOME`` — database, logs — under
``<results_dir>/prefect/``, next to the results it describes. A state file there (``server.json``: pid, host,
port, API URL) lets ``equi deploy`` find the server the project started earlier; ``equi server stop`` stops the
process group and removes the file. A state file whose process is gone, or that another host wrote, is stale and
ignored.

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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from equicore.errors import EquirobustError
from storage.atomic import atomic_write_json

HOST = "127.0.0.1"  # never 0.0.0.0: the API has no authentication
STATE_FILE = "server.json"
LOG_FILE = "server.log"
STARTUP_TIMEOUT_S = float(os.environ.get("EQUI_PREFECT_STARTUP_TIMEOUT_S", "180"))  # a loaded machine is slow
STOP_TIMEOUT_S = 30.0
_CLIENT_SETTINGS = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE")


class ServerError(EquirobustError):
    """The Prefect server cannot be started, found or reached (one line, for the CLI)."""


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the pid
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # a reused pid is not our server
        with contextlib.suppress(OSError):
            return b"prefect" in cmdline.read_bytes()
    return True


# ------------------------------------------------------------------------------------------------ state
def read_state(results_dir: str | os.PathLike[str]) -> ServerInfo | None:
    path = server_dir(results_dir) / STATE_FILE
    try:
        data = json.loads(path.read_text())
        return ServerInfo(**{k: data[k] for k in ServerInfo.__dataclass_fields__})
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
) -> tuple[ServerInfo, bool]:
    """Start the results directory's server, or find it running: (info, started now?)."""
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
        api_url = f"http://{HOST}:{port}/api"
        try:
            _wait_until_up(proc, api_url, log, timeout_s)
        except BaseException:
            _stop_group(proc.pid)
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
        )
        atomic_write_json(directory / STATE_FILE, asdict(info))
        return info, True


def stop_server(results_dir: str | os.PathLike[str], *, only_pid: int | None = None) -> ServerInfo | None:
    """Stop the results directory's server (SIGTERM to its process group, SIGKILL after 30 s) and remove its state
    file; the one stopped, or None when none was running. ``only_pid``: stop it only if it is that process."""
    directory = server_dir(results_dir)
    with _state_lock(directory):
        info = running_server(results_dir)
        if only_pid is not None and (info is None or info.pid != only_pid):
            return None
        if info is not None:
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
            if not _exists(pid):
                return
            time.sleep(0.1)


def _exists(pid: int) -> bool:
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


def _wait_until_up(proc: subprocess.Popen, api_url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"the Prefect server exited during startup (exit code {proc.returncode}): {_last_line(log)} "
                f"(log: {log})"
            )
        if api_error(api_url, timeout_s=2.0) is None:
            return
        time.sleep(0.5)
    raise ServerError(
        f"the Prefect server did not answer at {api_url} within {timeout_s:g} s (raise EQUI_PREFECT_STARTUP_TIMEOUT_S "
        f"on a slow machine; log: {log})"
    )


def _last_line(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1][:300]
    return "no output"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
