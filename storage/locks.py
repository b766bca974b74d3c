"""One writer per run: an exclusive ``flock`` on ``<results_dir>/locks/<run_id>.lock`` held for the whole run.

Two processes running the same config at once would otherwise compute every shard twice and race on the reduce;
the second one is told which process holds the run instead. The kernel releases a ``flock`` when its holder dies
(SIGKILL included), so a crashed run never leaves a stale lock behind and ``equi resume`` can take over at once.
The file records the holder (host, pid, start time) for the message; it is never deleted, because unlinking a lock
file while another process is about to lock it would let two processes hold locks on two different files.

``lock_holder`` (what ``equi status`` asks to tell "running" from "interrupted") tests the lock with a shared,
non-blocking ``flock`` released at once; it never waits and never keeps it. A run starting at that instant retries
its exclusive lock for a moment (``_PROBE_GRACE_S``), so a status probe is never mistaken for a live run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .atomic import storage_error_from_oserror
from .errors import RunLockedError
from .keys import safe_component

__all__ = ["lock_path", "lock_holder", "open_lock_file", "run_lock"]

_PROBE_GRACE_S = 0.5  # how long a run retries its lock before calling it held (a status probe holds it for µs)


def open_lock_file(path: Path) -> int:
    """Open (creating it and its folder) a lock file for ``flock``; storage errors name the path."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise storage_error_from_oserror(exc, path, note="") from exc


def lock_path(results_dir: str | Path, run_id: str) -> Path:
    """Where the lock of `run_id` lives."""
    return Path(results_dir) / "locks" / f"{safe_component(run_id, 'run id')}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def lock_holder(results_dir: str | Path, run_id: str) -> dict[str, Any] | None:
    """The recorded holder of the run's lock if the lock is held now, else None."""
    path = lock_path(results_dir, run_id)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        holder = {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    pid, host = holder.get("pid"), holder.get("host")
    if pid is None:
        return "another process"
    text = f"pid {pid} on {host}" + (f", since {holder['started_at']}" if holder.get("started_at") else "")
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        # flock is released when the last descriptor closes: a child that inherited it still holds the run.
        text += f"; pid {pid} has exited, but a process it started still holds the lock"
    return text


def _lock_exclusive(fd: int) -> bool:
    """Take the exclusive lock, retrying for ``_PROBE_GRACE_S`` (a ``lock_holder`` probe may hold it briefly)."""
    deadline = time.monotonic() + _PROBE_GRACE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


@contextlib.contextmanager
def run_lock(results_dir: str | Path, run_id: str) -> Iterator[Path]:
    """Hold the run's lock for the duration of the block; RunLockedError at once if a live process holds it."""
    path = lock_path(results_dir, run_id)
    fd = open_lock_file(path)
    try:
        if not _lock_exclusive(fd):
            holder = _read_holder(fd)
            raise RunLockedError(
                f"run {run_id} is already running ({_describe(holder)}; lock {path}): wait for it to finish, or "
                "stop it and `equi resume` the run"
            ) from None
        holder = {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        except OSError:
            pass  # the holder record only feeds the message; the lock itself is what matters
        yield path
    finally:
        os.close(fd)  # releases the flock
