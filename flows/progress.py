"""The calling process's progress callback for the running flow.

A module of its own on purpose: the flow function is pickled by value for the Dask workers, and a callback held in
one of its module's globals (a closure over a rich progress bar, with locks) would be dragged along; a module is
pickled by reference.
"""

from __future__ import annotations

from collections.abc import Callable

CALLBACK: list[Callable[[str], None] | None] = [None]
