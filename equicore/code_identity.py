"""Code identity: a digest of the source files a computation runs, so a cached result can be tied to the code that
made it and stay valid when unrelated code changes.

Pure and engine-local: modules are named by their import name and hashed as file bytes (never by path, so a copy of
the package elsewhere has the same identity). Digests are cached per process: a file edited while the process runs
is not seen until the next one, which is what a cache key of results computed by this process must reflect.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Iterable

from equicore.errors import InvalidInputError


@functools.cache
def module_file(module_name: str) -> str:
    """The source file of ``module_name`` (a package means its ``__init__.py``)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as exc:
        raise InvalidInputError(f"code identity: cannot find module {module_name!r} ({exc})") from None
    if spec is None or not spec.origin or not spec.has_location or not spec.origin.endswith(".py"):
        raise InvalidInputError(f"code identity: module {module_name!r} has no Python source file")
    return spec.origin


@functools.cache
def module_digest(module_name: str) -> str:
    """sha256 (hex) of the module's source bytes."""
    with open(module_file(module_name), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@functools.cache
def _digest_of_sorted(module_names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in module_names:
        h.update(f"{name}\0{module_digest(name)}\n".encode())
    return h.hexdigest()


def modules_digest(module_names: Iterable[str]) -> str:
    """sha256 (hex) over the names and source bytes of a set of modules; order and repeats do not matter."""
    names = tuple(sorted(set(module_names)))
    if not names:
        raise InvalidInputError("code identity: no modules to digest")
    return _digest_of_sorted(names)


def code_version(version: str, module_names: Iterable[str], length: int = 16) -> str:
    """``"<version>:<digest prefix>"``: the declared version (bumped by hand when the maths change in a way the
    sources do not show) and the digest of the modules the maths live in."""
    return f"{version}:{modules_digest(module_names)[:length]}"


def clear_code_identity_cache() -> None:
    """Forget file digests (for tools that edit sources and re-read them in one process)."""
    module_file.cache_clear()
    module_digest.cache_clear()
    _digest_of_sorted.cache_clear()
