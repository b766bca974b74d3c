"""Environment variables the engine reads (a light module: the CLI sets them before importing torch)."""

from __future__ import annotations

import os

ALLOW_OUTSIDE_ROOTS_ENV = "EQUI_ALLOW_OUTSIDE_ROOTS"  # "1": set by `equi ... --allow-outside-roots`


def outside_roots_allowed() -> bool:
    """True when the user passed ``--allow-outside-roots`` (the CLI sets the variable for itself and its workers)."""
    return os.environ.get(ALLOW_OUTSIDE_ROOTS_ENV) == "1"
