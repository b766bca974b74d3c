"""Read-only DuckDB access to the Parquet results: views `results` and `samples` over hive-partitioned files.

The database is in-memory, so queries never write a database file. After the views are created the connection
may only touch files under the results directory (`allowed_directories` + `enable_external_access=false`) and
its configuration is locked. `query` additionally accepts only a single read statement (SELECT/WITH/FROM,
DESCRIBE, SHOW, SUMMARIZE, plain EXPLAIN, PRAGMA show_tables/table_info), so COPY, CREATE, ATTACH, INSERT... fail.

Limits: ``timeout_s`` interrupts a statement that runs longer (``con.interrupt()`` from a timer thread) and
``max_rows`` stops reading after that many rows (at most ``max_rows + 1`` are ever fetched, so a streaming cross
join that explodes is not materialised); either one is a :class:`QueryLimitError`, as is a statement that needs
more than the connection's ``memory_limit`` (nothing spills to disk: ``temp_directory`` is empty). ``equi query``
sets all three by default.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from .errors import QueryError, QueryLimitError
from .results import RESULTS_SCHEMA

__all__ = ["DEFAULT_MAX_ROWS", "DEFAULT_MEMORY_LIMIT", "DEFAULT_TIMEOUT_S", "check_read_only", "connect", "query"]

# What `equi query` uses unless --timeout-s / --max-rows say otherwise (0 there means no limit).
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_ROWS = 100_000
DEFAULT_MEMORY_LIMIT = "2GB"  # of every connection (DuckDB's own default is 80% of the machine's memory)
_BATCH_ROWS = 2048

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


def connect(results_dir: str | Path, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with views `results` and `samples`; file access is limited to `results_dir`, memory to
    ``memory_limit`` (a DuckDB size such as "2GB"), and nothing is ever written to disk (no spilling).

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
        con.execute(f"SET memory_limit = {_sql_str(memory_limit)}")
        con.execute("SET temp_directory = ''")  # an in-memory database spills to ./.tmp otherwise
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


def _read_limited(rel: duckdb.DuckDBPyRelation, max_rows: int | None) -> pa.Table:
    """The relation's rows as Arrow, streamed in batches; QueryLimitError past ``max_rows`` (None: all rows)."""
    if max_rows is None:
        return _to_arrow(rel)
    reader = _arrow_reader(rel, min(_BATCH_ROWS, max_rows + 1))
    try:
        batches, n = [], 0
        for batch in reader:
            batches.append(batch)
            n += batch.num_rows
            if n > max_rows:
                raise QueryLimitError(
                    f"the query returns more than {max_rows} rows (the --max-rows limit): add a LIMIT or an "
                    "aggregation, or raise --max-rows (0 = no limit)"
                )
        return pa.Table.from_batches(batches, schema=reader.schema)
    finally:
        reader.close()  # the connection refuses new statements while a result is open


def _arrow_reader(rel: duckdb.DuckDBPyRelation, batch_rows: int) -> pa.RecordBatchReader:
    # duckdb>=2 names it to_arrow_reader; 1.x has fetch_arrow_reader / fetch_record_batch.
    for name in ("to_arrow_reader", "fetch_arrow_reader", "fetch_record_batch"):
        fn = getattr(rel, name, None)
        if fn is not None:
            return fn(batch_rows)
    raise QueryError("this duckdb version cannot stream Arrow batches")


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
    timeout_s: float | None = None,
    max_rows: int | None = None,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
) -> pa.Table | list[dict[str, Any]]:
    """Run one read-only statement against the results; a pyarrow Table (or a list of row dicts).

    ``timeout_s`` / ``max_rows`` (None: no limit) bound the statement's wall time and the rows it may return;
    ``memory_limit`` applies to a connection made here (a given ``con`` keeps its own). Past any of them,
    QueryLimitError (one line naming the limit and the flag that raises it).
    """
    if timeout_s is not None and not timeout_s > 0:
        raise QueryError(f"--timeout-s: expected a number of seconds > 0, got {timeout_s}")
    if max_rows is not None and max_rows < 0:
        raise QueryError(f"--max-rows: expected a number of rows >= 0, got {max_rows}")
    own = con is None
    con = connect(results_dir, memory_limit) if con is None else con
    timer = threading.Timer(timeout_s, con.interrupt) if timeout_s is not None else None
    try:
        check_read_only(con, sql)
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            rel = con.sql(sql, params=params) if params is not None else con.sql(sql)
            if rel is None:
                return [] if as_dicts else pa.table({})
            table = _read_limited(rel, max_rows)
        except duckdb.InterruptException as exc:
            raise QueryLimitError(
                f"the query was stopped after {timeout_s:g} s (the --timeout-s limit): narrow it, or raise --timeout-s"
            ) from exc
        except duckdb.OutOfMemoryException as exc:
            raise QueryLimitError(
                f"{_one_line(exc)}: the query needs more memory than the --memory-limit "
                f"({memory_limit if own else 'of this connection'}); narrow it, or raise --memory-limit"
            ) from exc
        except duckdb.Error as exc:
            raise QueryError(_one_line(exc)) from exc
        return table.to_pylist() if as_dicts else table
    finally:
        if timer is not None:
            timer.cancel()
        if own:
            con.close()
