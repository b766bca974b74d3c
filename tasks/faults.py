"""Fault injection for tests and drills: ``EQUI_FAULTS="defend:1:1,attack:*:always"`` makes the named step fail
on the given shard (``*`` = any) the given number of times (or always). Counts live in ``EQUI_FAULTS_DIR`` so they
hold across retries in other worker processes. Unset in normal runs: then this is a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path


class InjectedFault(RuntimeError):
    """Raised by an injected fault (a stand-in for a preempted worker or a flaky filesystem)."""


def maybe_fail(step: str, shard: int) -> None:
    spec = os.environ.get("EQUI_FAULTS")
    if not spec:
        return
    for rule in spec.split(","):
        parts = rule.strip().split(":")
        if len(parts) != 3:
            continue
        r_step, r_shard, times = parts
        if r_step != step or r_shard not in ("*", str(shard)):
            continue
        if times == "always":
            raise InjectedFault(f"injected fault in {step} shard {shard} (always)")
        counter = Path(os.environ.get("EQUI_FAULTS_DIR", ".")) / f"fault-{step}-{r_shard}-{shard}"
        # O_APPEND writes of one byte are atomic, so concurrent workers count correctly.
        fd = os.open(counter, os.O_CREAT | os.O_APPEND | os.O_WRONLY)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        if counter.stat().st_size <= int(times):
            raise InjectedFault(f"injected fault in {step} shard {shard} (failure {counter.stat().st_size} of {times})")
