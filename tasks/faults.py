"""Fault injection for tests and drills (see :mod:`storage.faults` for the ``EQUI_FAULTS`` syntax, fault points and
actions). ``EQUI_FAULTS="defend:1:1,attack:*:always"`` makes the named step fail on the given shard (``*`` = any)
the given number of times (or always). Unset in normal runs: then this is a no-op.

The engine lives in ``storage`` so that the storage layer's own fault points (a Parquet file or a Zarr chunk cut
short mid-write) need no import of ``tasks``.
"""

from __future__ import annotations

from storage.faults import InjectedFault, fault_point, hits

__all__ = ["InjectedFault", "fault_point", "hits", "maybe_fail"]


def maybe_fail(step: str, shard: int) -> None:
    """The fault point ``step`` of a shard step (``attack``, ``defend``, ``attack-computed``, ...)."""
    fault_point(step, shard)
