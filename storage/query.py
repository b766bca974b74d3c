"""Read-only DuckDB access to the Parquet results: views `results` and `samples` over hive-partitioned files.

The database is in-memory, so queries never write a database file. After the views are created the connection
may only touch files under the results directory (`allowed_directories` + `enable_external_access=false`) and
its configuration is locked. `query` additionally accepts only a single read statement (SELECT/WITH/FROM,
DESCRIBE, SHOW, SUMMARIZE, plain EXPLAIN, PRAGMA show_tables/table_info), so COPY, CREATE, ATTACH, INSERT... fail.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from .errors import QueryError
from .results import RESULTS_SCHEMA

__all__ = ["check_read_only", "connect", "query"]

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.float64(): "DOUBLE",
    pa.int64(): "BIGINT",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
}
# (view name, glob under results_dir, columns of the empty stand-in view when no file exists yet)
_VIEWS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "results": (
        "results/*/*.parquet",
        [(f.name, _DUCK_TYPES[f.type]) for f in RESULTS_SCHEMA],
    ),
    "samples": (
        "samples/*/*/*/*.parquet",
        [("run_id", "VARCHAR"), ("attack_key", "VARCHAR"), ("defense_key", "VARCHAR"), ("shard", "BIGINT")],
    ),
}
_PRAGMA_OK = re.compile(r"^\s*pragma\s+(show_tables|show_tables_expanded|table_info|show)\b", re.IGNORECASE)
_EXPLAIN = re.compile(r"^\s*explain\s+", re.IGNORECASE)


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    head = lines[0]
    # Keep DuckDB's "Did you mean ..." hint: it is usually the fix.
    hint = next((ln for ln in lines[1:3] if ln.startswith("Did you mean")), None)
    return f"{head} {hint}" if hint else head


def connect(results_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with views `results` and `samples`; file access is limited to `results_dir`.

    A view whose files do not exist yet is an empty view with the expected columns (reconnect after a run to see
    new partitions; files added under existing partitions show up immediately).
    """
    root = Path(results_dir).resolve()
    con = duckdb.connect(":memory:")
    try:
        for view, (pattern, empty_columns) in _VIEWS.items():
            if any(root.glob(pattern)):
                con.execute(
                    f"CREATE VIEW {view} AS SELECT * FROM read_parquet({_sql_str(str(root / pattern))}, "
                    "hive_partitioning = true, hive_types_autocast = false, union_by_name = true)"
                )
            else:
                cols = ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in empty_columns)
                con.execute(f"CREATE VIEW {view} AS SELECT {cols} WHERE false")
        # Order matters: directories must be allowed before external access is switched off, and the lock
        # stops a later `SET enable_external_access = true`.
        con.execute(f"SET allowed_directories = [{_sql_str(str(root) + '/')}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as exc:
        con.close()
        raise QueryError(f"cannot open results under {root}: {_one_line(exc)}") from exc
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise QueryError unless `sql` is exactly one read-only statement."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(_one_line(exc)) from exc
    if len(statements) != 1:
        raise QueryError(f"expected exactly one SQL statement, got {len(statements)}")
    kind = statements[0].type
    if kind == duckdb.StatementType.SELECT:
        return
    if kind == duckdb.StatementType.PRAGMA and _PRAGMA_OK.match(sql):
        return
    if kind == duckdb.StatementType.EXPLAIN and not re.match(r"^\s*explain\s+analy[sz]e\b", sql, re.IGNORECASE):
        check_read_only(con, _EXPLAIN.sub("", sql, count=1))
        return
    raise QueryError(f"only read-only queries are allowed (SELECT, DESCRIBE, SHOW, EXPLAIN); got {kind.name}")


def _to_arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    # duckdb>=2 names it to_arrow_table; 1.x has arrow()/fetch_arrow_table().
    for name in ("to_arrow_table", "fetch_arrow_table", "arrow"):
        fn = getattr(rel, name, None)
        if fn is not None:
            out = fn()
            return out.read_all() if isinstance(out, pa.RecordBatchReader) else out
    raise QueryError("this duckdb version cannot return Arrow tables")


def query(
    results_dir: str | Path,
    sql: str,
    params: Sequence[Any] | dict[str, Any] | None = None,
    *,
    as_dicts: bool = False,
    con: duckdb.DuckDBPyConnection | None = None,
) -> pa.Table | list[dict[str, Any]]:
    """Run one read-only statement against the results; a pyarrow Table (or a list of row dicts)."""
    own = con is None
    con = connect(results_dir) if con is None else con
    try:
        check_read_only(con, sql)
        try:
            rel = con.sql(sql, params=params) if params is not None else con.sql(sql)
            if rel is None:
                return [] if as_dicts else pa.table({})
            table = _to_arrow(rel)
        except duckdb.Error as exc:
            raise QueryError(_one_line(exc)) from exc
        return table.to_pylist() if as_dicts else table
    finally:
        if own:
            con.close()
