"""Typed registries: configs name transforms, attacks, defenses, metrics, models and datasets by string.

Modelled on lm-evaluation-harness' ``api/registry.py``: a registry maps a name to a factory, registration is a
decorator, and a lookup of an unknown name fails with the known names and a close match.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from equicore.errors import InvalidInputError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> factory producing a ``T``. ``kind`` is used in error messages ("attack", "defense", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@ATTACKS.register("pgd")``. ``meta`` is free-form (e.g. ``tasks=("classification",)``)."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            self._meta[name] = dict(meta)
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self._unknown_message(name)) from None

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def build(self, name: str, /, **params: Any) -> T:
        """Construct the entry, rejecting parameters the factory does not take (a typo must not pass silently)."""
        factory = self.get(name)
        accepted = accepted_params(factory)
        if accepted is not None:
            unknown = sorted(set(params) - accepted)
            if unknown:
                raise InvalidInputError(
                    f"{self.kind} {name!r} got unknown parameter(s) {unknown}; it accepts {sorted(accepted)}"
                )
        return factory(**params)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def _unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self._entries, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names()) or 'none'})"


def accepted_params(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword parameters a factory accepts, or None when it takes ``**kwargs``."""
    if dataclasses.is_dataclass(factory):
        return {f.name for f in dataclasses.fields(factory) if f.init}
    sig = inspect.signature(factory)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def describe(registry: Registry[Any]) -> Mapping[str, dict[str, Any]]:
    """Name -> metadata, for ``equi list`` and docs."""
    return {n: registry.meta(n) for n in registry.names()}


# The project's registries. Entries are registered by the modules that define them; ``equicore`` imports those
# modules on import so a lookup by name always sees every built-in entry.
TRANSFORMS: Registry[Any] = Registry("transform")
ATTACKS: Registry[Any] = Registry("attack")
LOSSES: Registry[Any] = Registry("attack loss")
DEFENSES: Registry[Any] = Registry("defense")
METRICS: Registry[Any] = Registry("metric")
MODELS: Registry[Any] = Registry("model")
DATASETS: Registry[Any] = Registry("dataset")
