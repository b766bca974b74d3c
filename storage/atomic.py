"""Atomic file replacement: write a hidden temp file in the target directory, fsync, then ``os.replace``."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DiskFullError, StorageError

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "is_temp_name",
    "storage_error_from_oserror",
]


def _temp_name(target: Path) -> Path:
    # Same directory as the target so os.replace never crosses filesystems; the leading dot hides it from
    # globs (`*.parquet`) and readers, and the pid/random suffix keeps concurrent writers apart.
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}")


def is_temp_name(name: str) -> bool:
    """True for names produced by `atomic_path` (left behind only by a crashed process)."""
    return name.startswith(".") and ".tmp-" in name


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error_from_oserror(
    exc: OSError, target: str | Path, note: str = "the previous file, if any, is intact"
) -> StorageError:
    """Turn an OSError into a StorageError naming `target` (disk full and quota spelled out, as DiskFullError)."""
    suffix = f" ({note})" if note else ""
    if exc.errno == errno.ENOSPC:
        return DiskFullError(f"no space left on device while writing {target}{suffix}")
    if exc.errno == errno.EDQUOT:
        return DiskFullError(f"disk quota exceeded while writing {target}{suffix}")
    return StorageError(f"could not write {target}: {exc.strerror or exc}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it is fsync'd and atomically renamed onto `path`.

    On any exception the temp file is removed and `path` is left untouched; an OSError (disk full, permission,
    ...) is re-raised as StorageError naming `path`.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error_from_oserror(exc, target) from exc
    tmp = _temp_name(target)
    try:
        yield tmp
        if not tmp.exists():
            raise StorageError(f"nothing was written to the temp file for {target}")
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, target)
        if fsync:
            fsync_dir(target.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise storage_error_from_oserror(exc, target) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview, *, fsync: bool = True) -> Path:
    """Atomically replace `path` with `data`; returns the path."""
    target = Path(path)
    with atomic_path(target, fsync=fsync) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
    return target


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Atomically replace `path` with `text`."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def atomic_write_json(path: str | Path, obj: Any, *, fsync: bool = True) -> Path:
    """Atomically write `obj` as indented, key-sorted JSON (NaN rejected so the file stays standard JSON)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=_json_default) + "\n"
    return atomic_write_text(path, text, fsync=fsync)


def _json_default(obj: Any) -> Any:
    # Manifests and failure records routinely carry numpy scalars, paths and datetimes.
    import datetime as _dt

    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return obj.as_posix()
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")
