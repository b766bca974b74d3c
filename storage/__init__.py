"""Storage layer: Zarr adversarial cache, Parquet results, DuckDB queries (numpy/zarr/pyarrow/duckdb only)."""

from __future__ import annotations

from .atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from .errors import (
    CacheCorruptError,
    CacheMissError,
    DiskFullError,
    QueryError,
    QueryLimitError,
    ResultCorruptError,
    RunLockedError,
    RunNotFoundError,
    SchemaError,
    StorageError,
)
from .keys import canonical_json, code_version, content_key, source_digest

__all__ = [
    "CacheCorruptError",
    "CacheMissError",
    "DiskFullError",
    "QueryError",
    "QueryLimitError",
    "ResultCorruptError",
    "RunLockedError",
    "RunNotFoundError",
    "SchemaError",
    "StorageError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "canonical_json",
    "code_version",
    "content_key",
    "source_digest",
]
