"""Fault injection for tests and drills, driven by the environment so it reaches Dask workers and subprocesses.

``EQUI_FAULTS="point:shard:times[:action],..."`` acts at the named fault point for the given shard (``*`` = any)
the first ``times`` times it is reached (or ``always``). Unset in normal runs: then every fault point is a no-op.

Fault points (where the code calls :func:`fault_point`):

=================  ===================================================================================
attack, defend     start of a shard step, before any work
attack-computed    adversarial images computed, not yet written to the cache
defend-computed    a shard defended and scored, its Parquet file not yet written
reduce             mid-reduce: before merging (attack, defense) unit number ``shard`` (config order)
parquet            a shard's Parquet temp file written, then cut to half its bytes (a write cut short)
results-parquet    the same for the reduced results table (shard 0)
zarr-chunk         a cache shard's chunk files written, then one cut to half its bytes; no marker yet
=================  ===================================================================================

Actions: ``fail`` (default) raises :class:`InjectedFault`; ``enospc`` raises ``OSError(ENOSPC)`` (a full disk);
``kill`` SIGKILLs this process (a preempted worker, or the flow process when it runs the steps itself);
``killgroup`` SIGKILLs this process's group (the flow process and its local workers at once; use it only in a
process started in its own session); ``hold`` writes this pid to ``EQUI_FAULTS_DIR/hold-<point>-<shard>.pid`` and
sleeps ``EQUI_FAULTS_HOLD_S`` seconds (default 300) so a test can kill the process from outside; ``sleep`` sleeps
``EQUI_FAULTS_SLEEP_S`` seconds (default 5) and goes on.

Every time a rule matches, the pid is appended as one line to ``EQUI_FAULTS_DIR/fault-<point>-<rule shard>-<shard>``
(``O_APPEND`` writes of one short line are atomic), so counts hold across retries in other worker processes and a
test can see which processes reached the point (``always`` rules record only when ``EQUI_FAULTS_DIR`` is set).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["ACTIONS", "InjectedFault", "fault_point", "hits"]

ACTIONS = ("fail", "enospc", "kill", "killgroup", "hold", "sleep")


class InjectedFault(RuntimeError):
    """Raised by an injected fault (a stand-in for a preempted worker or a flaky filesystem)."""


def _faults_dir() -> Path:
    return Path(os.environ.get("EQUI_FAULTS_DIR", "."))


def _counter(point: str, rule_shard: str, shard: int, directory: Path | None = None) -> Path:
    return (directory or _faults_dir()) / f"fault-{point}-{rule_shard}-{shard}"


def hits(point: str, shard: int, rule_shard: str | None = None, directory: str | Path | None = None) -> list[int]:
    """Pids of the processes that reached (point, shard) under a rule for ``rule_shard`` (default: ``shard``);
    ``directory`` defaults to ``EQUI_FAULTS_DIR``."""
    rule = str(shard) if rule_shard is None else rule_shard
    path = _counter(point, rule, shard, Path(directory) if directory is not None else None)
    try:
        return [int(line) for line in path.read_text().split()]
    except FileNotFoundError:
        return []


def _record_hit(counter: Path) -> int:
    fd = os.open(counter, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return len(counter.read_text().split())


def _cut_in_half(path: Path) -> None:
    # The bytes a write that was cut short leaves behind: the first half of the file.
    size = path.stat().st_size
    os.truncate(path, size // 2)


def fault_point(point: str, shard: int, *, partial: Path | Callable[[], Path | None] | None = None) -> None:
    """Act on the first matching rule of ``EQUI_FAULTS`` for (point, shard). ``partial`` is a file (or a function
    finding it, called only when a rule acts) to cut to half its bytes before acting: a write interrupted midway."""
    spec = os.environ.get("EQUI_FAULTS")
    if not spec:
        return
    for rule in spec.split(","):
        parts = rule.strip().split(":")
        if len(parts) not in (3, 4):
            continue
        r_point, r_shard, times = parts[:3]
        action = parts[3] if len(parts) == 4 else "fail"
        if r_point != point or r_shard not in ("*", str(shard)):
            continue
        if action not in ACTIONS:
            raise ValueError(f"EQUI_FAULTS: unknown action {action!r} in rule {rule!r} (known: {', '.join(ACTIONS)})")
        if times == "always" and "EQUI_FAULTS_DIR" not in os.environ:
            count = 0  # nothing to count, and no stray counter file in the working directory
        else:
            count = _record_hit(_counter(point, r_shard, shard))
        if times != "always" and count > int(times):
            return
        target = partial() if callable(partial) else partial
        if target is not None and target.exists():
            _cut_in_half(target)
        _act(action, point, shard, count, times)
        return


def _act(action: str, point: str, shard: int, count: int, times: str) -> None:
    what = f"{point} shard {shard}"
    if action == "fail":
        suffix = "always" if times == "always" else f"failure {count} of {times}"
        raise InjectedFault(f"injected fault in {what} ({suffix})")
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {what})")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "killgroup":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    elif action == "hold":
        pid_file = _faults_dir() / f"hold-{point}-{shard}.pid"
        tmp = pid_file.with_name(pid_file.name + f".tmp-{os.getpid()}")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, pid_file)  # the test polls for this file: it must never see it half-written
        time.sleep(float(os.environ.get("EQUI_FAULTS_HOLD_S", "300")))
    elif action == "sleep":
        time.sleep(float(os.environ.get("EQUI_FAULTS_SLEEP_S", "5")))
