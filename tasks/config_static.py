"""The static pass of config validation (:func:`tasks.config.parse_config` runs it first).

While it is on, names are checked against the registries' static catalogue (:mod:`equicore.catalogue`) and nothing
is built, so an unknown key or name, a wrong type or a bound fails without importing torch; the full pass that
follows checks everything else with the live registries.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, ConfigDict

from equicore.errors import EquirobustError


class StrictModel(BaseModel):
    """The base of every config section: no unknown keys; strict types (no bool as a number, no "8" as a number, no
    "yes" as a boolean); every float finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


_STATIC_PASS: contextvars.ContextVar[bool] = contextvars.ContextVar("static_pass", default=False)


def static_pass_on() -> bool:
    return _STATIC_PASS.get()


@contextmanager
def static_pass() -> Iterator[None]:
    token = _STATIC_PASS.set(True)
    try:
        yield
    finally:
        _STATIC_PASS.reset(token)


def checked(fn: Callable[[Any], Any], value: Any) -> Any:
    """Run a registry check; re-raise its error as ValueError so pydantic reports it with the field path."""
    try:
        fn(value)
    except EquirobustError as e:
        raise ValueError(str(e)) from None
    return value


def known(plural: str, registry: Any, name: str) -> str:
    """A registered name: from the static catalogue in the static pass, else from the live registry."""
    if static_pass_on():
        from equicore import catalogue

        return checked(lambda n: catalogue.check_name(plural, n), name)
    return checked(registry.get, name)
