"""Typed registries: configs name transforms, attacks, defenses, metrics, models and datasets by string.

Modelled on lm-evaluation-harness' ``api/registry.py``: a registry maps a name to a factory (a class, or a function
building the thing), registration is a decorator, and a lookup of an unknown name fails with the known names and a
close match. A registry with a ``base_cls`` checks what is registered: a class must subclass it, a function whose
return annotation names a class must return a subclass, and whatever ``build`` makes must be an instance of it.

Every entry also has a code identity (``code_version``): its ``version`` (metadata, default ``"1"``, bumped by hand
when its maths change in a way its sources do not show) and a digest of the source files its maths live in: the
module defining the factory plus the ``modules`` the entry declares (see :mod:`equicore.code_identity`).
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import inspect
import sys
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from equicore.code_identity import code_version as _code_version
from equicore.errors import InvalidInputError, RegistrationError, UnknownNameError

T = TypeVar("T")

DEFAULT_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """One registration: the factory, its free-form metadata (``version`` included) and the modules its maths live
    in (the defining module first)."""

    name: str
    factory: Callable[..., Any]
    meta: dict[str, Any]
    modules: tuple[str, ...]

    @property
    def version(self) -> str:
        return str(self.meta["version"])


class Registry(Generic[T]):
    """Name -> factory producing a ``T``. ``kind`` is used in error messages ("attack", "defense", ...).

    ``base_cls``: the class every entry must produce, or ``"package.module:Class"`` resolved on first use from the
    imported module (for base classes whose modules import this one); None accepts any callable.
    """

    def __init__(self, kind: str, base_cls: type | str | None = None) -> None:
        self.kind = kind
        self._base_cls = base_cls
        self._entries: dict[str, RegistryEntry] = {}

    # ------------------------------------------------------------------------------------------------ registration

    @property
    def base_cls(self) -> type | None:
        if isinstance(self._base_cls, str):
            self._base_cls = _resolve_class(self._base_cls, self.kind)
        return self._base_cls

    def register(
        self, name: str, *, version: str | int = DEFAULT_VERSION, modules: Sequence[str] = (), **meta: Any
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@ATTACKS.register("pgd")``. ``meta`` is free-form (e.g. ``tasks=("classification",)``);
        ``version`` (a string; an int is taken as its string) is stored in it. ``modules``: import names of the
        modules the entry's maths live in besides the one defining the factory (a shared loop, its loss, seeding...).
        """

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            self.add(name, factory, version=version, modules=modules, **meta)
            return factory

        return decorator

    def add(
        self,
        name: str,
        factory: Callable[..., T],
        *,
        version: str | int = DEFAULT_VERSION,
        modules: Sequence[str] = (),
        **meta: Any,
    ) -> RegistryEntry:
        """What ``register`` does, without the decorator."""
        if not isinstance(name, str) or not name:
            raise RegistrationError(f"{self.kind}: entry names are non-empty strings, got {name!r}")
        if name in self._entries:
            raise RegistrationError(f"{self.kind} {name!r} is registered twice")
        if isinstance(version, bool) or not isinstance(version, str | int) or not str(version):
            raise RegistrationError(f"{self.kind} {name!r}: version must be a non-empty string, got {version!r}")
        self._check_factory(name, factory)
        declared = (modules,) if isinstance(modules, str) else tuple(modules)
        if not all(isinstance(m, str) and m and all(p.isidentifier() for p in m.split(".")) for m in declared):
            raise RegistrationError(f"{self.kind} {name!r}: modules must be import names, got {list(declared)}")
        home = getattr(factory, "__module__", None)
        if not isinstance(home, str):
            raise RegistrationError(f"{self.kind} {name!r}: {factory!r} has no defining module")
        entry = RegistryEntry(name, factory, {**meta, "version": str(version)}, tuple(dict.fromkeys((home, *declared))))
        self._entries[name] = entry
        return entry

    def _check_factory(self, name: str, factory: Any) -> None:
        what = f"{self.kind} {name!r}"
        if not callable(factory):
            raise RegistrationError(f"{what}: expected a class or a factory function, got {factory!r}")
        base = self.base_cls
        if base is None:
            return
        if inspect.isclass(factory):
            if not issubclass(factory, base):
                raise RegistrationError(
                    f"{what}: class {factory.__qualname__} is not a subclass of {base.__qualname__}"
                )
            return
        returned = declared_return_class(factory)
        if returned is not None and not issubclass(returned, base):
            raise RegistrationError(
                f"{what}: factory {getattr(factory, '__qualname__', factory)!r} returns {returned.__qualname__}, "
                f"not a {base.__qualname__}"
            )

    # ---------------------------------------------------------------------------------------------------- lookup

    @property
    def _loaded(self) -> dict[str, RegistryEntry]:
        """The entries, the engine's built-in ones included: looking a name up is what imports them (torch and
        all), so ``import equicore`` and the read-only CLI stay fast."""
        load_builtins()
        return self._entries

    def entry(self, name: str) -> RegistryEntry:
        try:
            return self._loaded[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None

    def get(self, name: str) -> Callable[..., T]:
        return self.entry(name).factory

    __getitem__ = get

    def meta(self, name: str) -> dict[str, Any]:
        return self.entry(name).meta

    def version(self, name: str) -> str:
        return self.entry(name).version

    def modules(self, name: str) -> tuple[str, ...]:
        """Import names of the modules the entry's maths live in (the defining module first)."""
        return self.entry(name).modules

    def code_version(self, name: str) -> str:
        """``"<version>:<16 hex>"``: the entry's version and the sha256 of its modules' sources (see
        :func:`equicore.code_identity.code_version`). Changes when any of those files changes, and only then."""
        entry = self.entry(name)
        return _code_version(entry.version, entry.modules)

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
        built = factory(**params)
        base = self.base_cls
        if base is not None and not isinstance(built, base):
            raise RegistrationError(
                f"{self.kind} {name!r} built a {type(built).__qualname__}, not a {base.__qualname__}"
            )
        return built

    def names(self) -> list[str]:
        return sorted(self._loaded)

    # Read like the name -> factory dicts some registries replaced (``VIEW_SETS.items()``); ``get`` raises.
    def keys(self) -> list[str]:
        return self.names()

    def values(self) -> list[Callable[..., T]]:
        return [self._loaded[n].factory for n in self.names()]

    def items(self) -> list[tuple[str, Callable[..., T]]]:
        return [(n, self._loaded[n].factory) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._loaded

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._loaded)

    def __repr__(self) -> str:
        base = self.base_cls
        return f"Registry({self.kind!r}, base_cls={base.__qualname__ if base else None}, {len(self)} entries)"

    def unknown_message(self, name: object) -> str:
        """ "unknown <kind> 'x'; did you mean 'y'? (known: ...)": for lookups that raise their own error type."""
        return unknown_name_message(self.kind, name, self.names())


def unknown_name_message(kind: str, name: object, known: Sequence[str]) -> str:
    """ "unknown <kind> 'x'; did you mean 'y'? (known: ...)" over the sorted ``known`` names."""
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (known: {', '.join(known) or 'none'})"


_BUILTINS: dict[str, Any] = {"loaded": False, "loader": None}


def set_builtins_loader(loader: Callable[[], None]) -> None:
    """The function importing every built-in registration (``equicore/__init__.py`` sets it: the registry module
    itself does not import the engine, which imports it)."""
    _BUILTINS["loader"] = loader


def load_builtins() -> None:
    """Import every module of the engine that registers built-in entries (once; safe to call during that import)."""
    if _BUILTINS["loaded"] or _BUILTINS["loader"] is None:
        return
    _BUILTINS["loaded"] = True  # before the import: registering modules may look names up while loading
    try:
        _BUILTINS["loader"]()
    except BaseException:
        _BUILTINS["loaded"] = False
        raise


def accepted_params(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword parameters a factory accepts, or None when it takes ``**kwargs``. A factory taking ``**kwargs`` may
    declare what it accepts in an ``accepted`` attribute."""
    declared = getattr(factory, "accepted", None)
    if declared is not None and not inspect.isclass(factory):
        return set(declared)
    if dataclasses.is_dataclass(factory):
        return {f.name for f in dataclasses.fields(factory) if f.init}
    sig = inspect.signature(factory)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def declared_return_class(factory: Callable[..., Any]) -> type | None:
    """The class a factory function's return annotation names (``list`` for ``list[X]``), or None when it has none
    or it is not a plain class (a ``Callable[...]`` alias, a union, a name that cannot be resolved): ``build`` checks
    what those factories make. String annotations (``from __future__ import annotations``) are resolved as dotted
    names in the factory's module, never evaluated."""
    try:
        annotation = inspect.signature(factory).return_annotation
    except (TypeError, ValueError):
        return None
    if annotation is inspect.Signature.empty:
        return None
    if isinstance(annotation, str):
        annotation = _resolve_dotted(annotation.split("[", 1)[0].strip(), getattr(factory, "__globals__", {}))
    origin = typing.get_origin(annotation) or annotation
    return origin if inspect.isclass(origin) else None


def _resolve_dotted(name: str, namespace: Mapping[str, Any]) -> Any:
    """``"nn.Module"`` -> the object, looked up in ``namespace`` then builtins; None when it is not a dotted name."""
    head, *rest = name.split(".")
    if not head.isidentifier() or not all(part.isidentifier() for part in rest):
        return None
    obj = namespace[head] if head in namespace else getattr(builtins, head, None)
    for part in rest:
        obj = getattr(obj, part, None)
    return obj


def describe(registry: Registry[Any]) -> Mapping[str, dict[str, Any]]:
    """Name -> metadata, for ``equi list`` and docs."""
    return {n: registry.meta(n) for n in registry.names()}


def _resolve_class(path: str, kind: str) -> type:
    """``"package.module:Class"`` from the already imported module (the modules registering entries import their
    base class, so it is imported by the time the first entry registers)."""
    module_name, _, attr = path.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        raise RegistrationError(f"{kind} registry: its base class {path!r} is in a module not imported yet")
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls):
        raise RegistrationError(f"{kind} registry: cannot resolve its base class {path!r}")
    return cls


# The project's registries. Entries are registered by the modules that define them; ``equicore`` imports those
# modules on import so a lookup by name always sees every built-in entry. Base classes are named by import path
# (their modules import this one) and resolved when the first entry registers.
TRANSFORMS: Registry[Any] = Registry("transform", base_cls="equicore.transforms.base:InvertibleTransform")
ATTACKS: Registry[Any] = Registry("attack", base_cls="equicore.attacks.attack:Attack")
LOSSES: Registry[Any] = Registry("attack loss", base_cls=Callable)
DEFENSES: Registry[Any] = Registry("defense", base_cls="equicore.defenses.base:Defense")
METRICS: Registry[Any] = Registry("metric", base_cls="equicore.metrics.base:MetricState")
MODELS: Registry[Any] = Registry("model", base_cls="torch.nn:Module")
DATASETS: Registry[Any] = Registry("dataset", base_cls="equicore.datasets.base:SampleDataset")
