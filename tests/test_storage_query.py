"""Tests for storage.query: DuckDB views over the Parquet results, read-only behaviour."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from storage import results as R
from storage.errors import QueryError
from storage.query import connect, query


def _row(run: str, metric: str, value: float) -> dict:
    return {
        "config_hash": "cfg",
        "git_sha": None,
        "package_versions": {"torch": "2.5"},
        "dataset": "cifar10",
        "model": "resnet18",
        "attack": "pgd",
        "attack_params": {"eps": 8},
        "defense": "none",
        "defense_params": {},
        "metric": metric,
        "value": value,
        "n_samples": 10,
        "wall_time_s": 1.0,
    }


@pytest.fixture()
def results_dir(tmp_path: Path) -> Path:
    R.write_results_table(tmp_path, "run1", [_row("run1", "clean_acc", 0.9), _row("run1", "robust_acc", 0.4)])
    R.write_results_table(tmp_path, "20240101", [_row("20240101", "clean_acc", 0.8)])
    for shard in (0, 1):
        unit = {"attack_key": "pgd8", "defense_key": "none", "shard": shard}
        samples = [{"sample_id": f"s{shard}{i}", "correct": i == 0} for i in range(3)]
        R.write_shard(tmp_path, "run1", unit, samples, {"cm": np.eye(2, dtype=np.int64)})
    return tmp_path


def test_views_over_results_and_samples(results_dir: Path) -> None:
    rows = query(results_dir, "SELECT run_id, metric, value FROM results ORDER BY run_id, metric", as_dicts=True)
    assert rows == [
        {"run_id": "20240101", "metric": "clean_acc", "value": 0.8},  # hive value stays a string
        {"run_id": "run1", "metric": "clean_acc", "value": 0.9},
        {"run_id": "run1", "metric": "robust_acc", "value": 0.4},
    ]
    table = query(
        results_dir,
        "SELECT attack_key, shard, count(*) AS n, sum(correct::INT) AS ok FROM samples "
        "WHERE run_id = ? GROUP BY ALL ORDER BY shard",
        ["run1"],
    )
    assert isinstance(table, pa.Table)
    assert table.to_pylist() == [
        {"attack_key": "pgd8", "shard": 0, "n": 3, "ok": 1},
        {"attack_key": "pgd8", "shard": 1, "n": 3, "ok": 1},
    ]
    assert query(results_dir, "DESCRIBE results").num_rows >= 15
    assert {r["name"] for r in query(results_dir, "SHOW TABLES", as_dicts=True)} == {"results", "samples"}


def test_empty_results_dir_gives_empty_typed_views(tmp_path: Path) -> None:
    assert query(tmp_path, "SELECT count(*) AS n FROM results", as_dicts=True) == [{"n": 0}]
    cols = {r["column_name"]: r["column_type"] for r in query(tmp_path, "DESCRIBE results", as_dicts=True)}
    assert cols["value"] == "DOUBLE" and cols["n_samples"] == "BIGINT" and cols["run_id"] == "VARCHAR"
    assert query(tmp_path, "SELECT * FROM samples").num_rows == 0


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT * FROM results) TO '{dir}/leak.csv'",
        "COPY results TO '/tmp/equirobust-leak.parquet'",
        "CREATE TABLE t AS SELECT * FROM results",
        "CREATE VIEW v AS SELECT 1",
        "INSERT INTO results VALUES (1)",
        "DROP VIEW results",
        "ATTACH '{dir}/x.duckdb' AS x",
        "SET enable_external_access = true",
        "EXPLAIN ANALYZE COPY results TO '{dir}/leak.csv'",
        "SELECT 1; DROP VIEW results",
    ],
)
def test_write_statements_are_rejected(results_dir: Path, sql: str) -> None:
    before = sorted(p for p in results_dir.rglob("*"))
    with pytest.raises(QueryError):
        query(results_dir, sql.format(dir=results_dir))
    assert sorted(p for p in results_dir.rglob("*")) == before
    assert not Path("/tmp/equirobust-leak.parquet").exists()


def test_raw_connection_is_locked_down(results_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    con = connect(results_dir)
    try:
        assert con.execute("SELECT count(*) FROM results").fetchone() == (3,)
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.Error):
            con.execute(f"COPY (SELECT 1) TO '{outside}/leak.csv'")
        with pytest.raises(duckdb.Error):
            con.execute(f"SELECT * FROM read_csv('{outside}/anything.csv')")
        # Queries through the guard share the connection.
        assert query(results_dir, "SELECT count(*) AS n FROM samples", con=con, as_dicts=True) == [{"n": 6}]
    finally:
        con.close()
    assert list(outside.iterdir()) == []


def test_query_errors_are_one_line(results_dir: Path) -> None:
    with pytest.raises(QueryError) as info:
        query(results_dir, "SELECT * FROM resultz")
    msg = str(info.value)
    assert "\n" not in msg and "resultz" in msg and "results" in msg
    with pytest.raises(QueryError, match="syntax"):
        query(results_dir, "SELEC 1")
    with pytest.raises(QueryError, match="one SQL statement"):
        query(results_dir, "")
