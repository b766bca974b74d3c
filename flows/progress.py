"""The calling process's progress callbacks for the running flow.

A module of its own on purpose: the flow function is pickled by value for the Dask workers, and a callback held in
one of its module's globals (a closure over a rich progress bar, with locks) would be dragged along; a module is
pickled by reference.
"""

from __future__ import annotations

from collections.abc import Callable

CALLBACK: list[Callable[[str], None] | None] = [None]  # a unit of this kind ("attack" | "defend") finished
PHASE: list[Callable[[str], None] | None] = [None]  # the run entered a named start-up phase


def phase(text: str) -> None:
    """Announce a start-up phase ("loading the model", "starting the Prefect API") to whoever displays progress."""
    callback = PHASE[0]
    if callback is not None:
        callback(text)
