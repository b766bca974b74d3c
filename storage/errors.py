"""Exceptions raised by the storage layer; every message names the path, key or shard involved."""

from __future__ import annotations

from collections.abc import Sequence


class StorageError(Exception):
    """Base class for storage failures (I/O errors, disk full, corrupt or missing records)."""


class DiskFullError(StorageError):
    """A write failed because the disk (or the quota) is full; what was written before is intact."""


class RunLockedError(StorageError):
    """Another live process holds the lock of this run (the same config is already running)."""


class SchemaError(StorageError, ValueError):
    """Rows, samples or state that do not fit the expected columns or types."""


class CacheMissError(StorageError):
    """The requested (key, shard) has no completed entry in the adversarial cache."""


class CacheCorruptError(StorageError):
    """A completed cache shard whose data does not match its recorded checksums.

    `bad_samples` lists the sample ids whose bytes are wrong or unreadable and `bad_chunks` the chunk indices
    (along the sample axis) that could not be decoded, so the damage can be pinpointed on disk.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str,
        shard: int,
        bad_samples: Sequence[str] = (),
        bad_chunks: Sequence[int] = (),
    ) -> None:
        super().__init__(message)
        self.key = key
        self.shard = shard
        self.bad_samples = list(bad_samples)
        self.bad_chunks = list(bad_chunks)


class ResultCorruptError(StorageError):
    """A result Parquet file (or its embedded metric state) that cannot be read back intact."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class RunNotFoundError(StorageError):
    """No manifest exists for the requested run id."""


class QueryError(StorageError):
    """A DuckDB query that failed or that is not a read-only statement; the message is one line."""


class QueryLimitError(QueryError):
    """A read-only query that ran past its time limit or returned more rows than allowed."""
