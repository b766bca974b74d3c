"""Content-addressed keys: canonical JSON of a config plus the code version that produced it."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "canonical_json",
    "code_version",
    "content_key",
    "safe_component",
    "source_digest",
    "to_canonical",
]

# Integral floats up to 2**53 are written as ints so that `eps: 8` and `eps: 8.0` give the same key.
_EXACT_INT_LIMIT = 2**53
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}")


def to_canonical(obj: Any, _path: str = "$") -> Any:
    """Convert `obj` to plain JSON types (dict with str keys, list, str, int, float, bool, None).

    Tuples become lists, numpy scalars/arrays become Python numbers/lists, sets become sorted lists. NaN and
    infinities, non-string dict keys and unknown types raise (TypeError/ValueError naming the offending field).
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        if not math.isfinite(value):
            raise ValueError(f"{_path}: {value!r} is not allowed in a canonical config (NaN/inf)")
        if value.is_integer() and abs(value) <= _EXACT_INT_LIMIT:
            return int(value)
        return value
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{_path}: dict key {k!r} is {type(k).__name__}, canonical JSON needs str keys")
            out[k] = to_canonical(v, f"{_path}.{k}")
        return out
    if isinstance(obj, list | tuple):
        return [to_canonical(v, f"{_path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, set | frozenset):
        items = [to_canonical(v, f"{_path}{{}}") for v in obj]
        try:
            return sorted(items)
        except TypeError as exc:
            raise TypeError(f"{_path}: set elements are not mutually orderable") from exc
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{_path}: numpy array of dtype {obj.dtype} is not allowed in a canonical config")
        return to_canonical(obj.tolist(), _path)
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"{_path}: {type(obj).__name__} is not JSON-serialisable in a canonical config")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, shortest round-trip float repr, ASCII only."""
    return json.dumps(to_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def content_key(obj: Any, code_version: str, length: int = 24) -> str:
    """Hex sha256 of the canonical JSON of {"config": obj, "code_version": code_version}, truncated."""
    if not 8 <= length <= 64:
        raise ValueError(f"length must be in [8, 64], got {length}")
    payload = canonical_json({"config": obj, "code_version": code_version})
    return hashlib.sha256(payload.encode("ascii")).hexdigest()[:length]


def source_digest(source_dirs: Iterable[str | Path], length: int = 12) -> str:
    """Hash of all ``*.py`` files under the given directories, in sorted relative-path order.

    The relative path and length of every file are hashed with its bytes, so renames and moves change the digest.
    `__pycache__` and hidden directories are skipped (they are not source).
    """
    h = hashlib.sha256()
    for root in source_dirs:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"source directory {root} does not exist")
        files = sorted(_py_files(root), key=lambda p: p.relative_to(root).as_posix())
        h.update(f"dir:{root.name}\0".encode())
        for p in files:
            data = p.read_bytes()
            h.update(f"{p.relative_to(root).as_posix()}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()[:length]


def _py_files(root: Path) -> Iterable[Path]:
    for p in root.rglob("*.py"):
        if not any(part.startswith((".", "__pycache__")) for part in p.relative_to(root).parts[:-1]):
            yield p


def code_version(source_dirs: Iterable[str | Path], package: str = "equirobust") -> str:
    """`<package version>+<source digest>`, e.g. ``0.1.0+3f2a9c1b7d4e``; part of every cache key."""
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    return f"{version}+{source_digest(source_dirs)}"


def safe_component(value: str, what: str) -> str:
    """Check that `value` can be used as one path component (no separators, '=', '..' or leading dot)."""
    if not isinstance(value, str) or not _SAFE_COMPONENT.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not a safe path component: use letters, digits and '_.+-' "
            "(starting with a letter or digit, at most 200 characters, no '..')"
        )
    return value
