"""Tests for storage.state, storage.results (Parquet shards, reduced table, manifests, failures)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import results as R
from storage.errors import ResultCorruptError, RunNotFoundError, SchemaError, StorageError
from storage.state import dumps_state, loads_state

UNIT = {"attack_key": "a1b2c3", "defense_key": "none", "shard": 3, "attack": "pgd", "dataset": "cifar10"}


def _state() -> dict:
    return {
        "confusion": (np.arange(12, dtype=np.int64).reshape(3, 4) * (2**52 + 1)),  # beyond float64 precision
        "count": 2**63 - 1,
        "pixels": np.array([1, 2, 3], dtype=np.uint8),
        "iou_sum": np.array([0.1, np.nan, -np.inf], dtype=np.float64),
        "scalar": np.float32(0.25),
        "mean": float("nan"),
        "by_class": {0: {"tp": 5}, 7: (1, 2.5)},
        "detections": [{"image_id": 4, "rle": {"size": [2, 2], "counts": b"\x00\x01"}, "score": 0.875}],
        "$odd": "key with a tag prefix",
        "empty": np.zeros((0, 5), dtype=np.int32),
    }


def _assert_state_equal(got: object, want: object) -> None:
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    elif isinstance(want, np.generic):
        assert type(got) is type(want) and got.tobytes() == want.tobytes()
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for k in want:
            _assert_state_equal(got[k], want[k])
    elif isinstance(want, list | tuple):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _assert_state_equal(g, w)
    elif isinstance(want, float) and np.isnan(want):
        assert isinstance(got, float) and np.isnan(got)
    else:
        assert type(got) is type(want) and got == want


def test_state_codec_round_trip_is_exact() -> None:
    state = _state()
    _assert_state_equal(loads_state(dumps_state(state)), state)
    with pytest.raises(SchemaError, match="confusion"):
        dumps_state({"confusion": np.array([object()], dtype=object)})
    with pytest.raises(SchemaError, match="set"):
        dumps_state({"s": {1, 2}})


def _samples(n: int = 4) -> list[dict]:
    return [{"sample_id": f"s{i}", "correct": i % 2 == 0, "loss": 0.5 * i, "pred": i} for i in range(n)]


def test_write_shard_round_trip_and_layout(tmp_path: Path) -> None:
    path = R.write_shard(tmp_path, "run1", UNIT, _samples(), _state())
    assert path == tmp_path / "samples/run_id=run1/attack_key=a1b2c3/defense_key=none/shard=00003.parquet"
    table, state = R.read_shard(path)
    assert table.column("sample_id").to_pylist() == ["s0", "s1", "s2", "s3"]
    assert table.column("shard").to_pylist() == [3] * 4
    assert not any(k.startswith(b"equirobust.") for k in (table.schema.metadata or {}))
    _assert_state_equal(state, _state())
    assert R.read_shard_unit(path) == {**UNIT, "run_id": "run1"}
    assert R.shard_done(tmp_path, "run1", "a1b2c3", "none", 3)
    assert not R.shard_done(tmp_path, "run1", "a1b2c3", "none", 4)
    assert R.list_shards(tmp_path, "run1") == [path]
    assert R.list_shards(tmp_path, "other") == []
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_large_state_and_arrow_table_input(tmp_path: Path) -> None:
    big = {"rles": [{"counts": "x" * 50, "id": i} for i in range(3000)], "cm": np.eye(150, dtype=np.int64)}
    table = pa.table({"sample_id": ["a", "b"], "iou": [0.5, 0.25]})
    path = R.write_shard(tmp_path, "run1", {**UNIT, "shard": 0}, table, big)
    meta = pq.ParquetFile(path).schema_arrow.metadata
    assert meta[b"equirobust.state_encoding"] == b"json+zlib+base64"
    got_table, got_state = R.read_shard(path)
    assert got_table.column("iou").to_pylist() == [0.5, 0.25]
    _assert_state_equal(got_state, big)


def test_write_shard_is_write_once(tmp_path: Path) -> None:
    path = R.write_shard(tmp_path, "run1", UNIT, _samples(4), {"n": 4})
    before = (path.stat().st_mtime_ns, path.read_bytes())
    again = R.write_shard(tmp_path, "run1", UNIT, _samples(2), {"n": 2})
    assert again == path
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert R.read_shard(path)[1] == {"n": 4}


@pytest.mark.parametrize("damage", ["truncate", "flip_page", "empty"])
def test_corrupt_shard_detected_then_recomputed(tmp_path: Path, damage: str) -> None:
    samples = [{"sample_id": f"s{i}", "loss": float(i)} for i in range(2000)]
    path = R.write_shard(tmp_path, "run1", UNIT, samples, {"n": np.int64(2000)})
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) - 40]))
    elif damage == "flip_page":
        data[100] ^= 0xFF  # inside the first data page; the footer is intact
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"")
    with pytest.raises(ResultCorruptError) as info:
        R.read_shard(path)
    assert info.value.path == str(path) and str(path) in str(info.value)
    if damage != "flip_page":
        assert not R.shard_done(tmp_path, "run1", UNIT["attack_key"], UNIT["defense_key"], 3)
    # write-once must not keep a corrupt file: the pipeline simply writes again.
    assert R.write_shard(tmp_path, "run1", UNIT, samples, {"n": np.int64(2000)}) == path
    table, state = R.read_shard(path)
    assert table.num_rows == 2000 and state["n"] == np.int64(2000)


def test_state_tampering_detected(tmp_path: Path) -> None:
    path = R.write_shard(tmp_path, "run1", UNIT, _samples(), {"n": 1})
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[b"equirobust.state"] = b'{"n":2}'
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(ResultCorruptError, match="checksum"):
        R.read_shard(path)
    assert R.discard_shard(path) and not path.exists() and not R.discard_shard(path)


def test_samples_partition_columns_must_agree(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="attack_key"):
        R.write_shard(tmp_path, "run1", UNIT, [{"sample_id": "a", "attack_key": "other"}], {})
    R.write_shard(tmp_path, "run1", UNIT, [{"sample_id": "a", "attack_key": "a1b2c3"}], {})
    with pytest.raises(SchemaError, match="missing"):
        R.write_shard(tmp_path, "run1", {"attack_key": "x"}, [], {})
    with pytest.raises(ValueError, match="run id"):
        R.write_shard(tmp_path, "../x", UNIT, [], {})


def _row(metric: str = "robust_acc", value: float = 0.5, **kw: object) -> dict:
    row = {
        "config_hash": "cfg123",
        "git_sha": "deadbeef",
        "package_versions": {"torch": "2.5.1", "zarr": "3.1"},
        "dataset": "cifar10",
        "model": "resnet18",
        "attack": "pgd",
        "attack_params": {"steps": 10, "eps": 8.0},
        "defense": "none",
        "defense_params": None,
        "metric": metric,
        "value": value,
        "n_samples": 100,
        "wall_time_s": 12.5,
    }
    row.update(kw)
    return row


def test_results_table_types_and_replace(tmp_path: Path) -> None:
    created = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    rows = [_row("clean_acc", 0.9, created_at=created), _row("robust_acc", np.float32(0.25), n_samples=np.int64(100))]
    path = R.write_results_table(tmp_path, "run1", rows)
    assert path == tmp_path / "results/run_id=run1/part-0.parquet"
    table = R.read_results_table(tmp_path, "run1")
    assert table.schema.names == R.RESULTS_SCHEMA.names
    assert table.schema.field("value").type == pa.float64()
    assert table.schema.field("n_samples").type == pa.int64()
    assert table.schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    got = table.to_pylist()
    assert [r["run_id"] for r in got] == ["run1", "run1"]
    assert got[0]["attack_params"] == '{"eps":8,"steps":10}'
    assert got[0]["defense_params"] is None
    assert got[0]["created_at"] == created
    assert got[1]["value"] == 0.25 and got[1]["created_at"] is not None

    # A second reduce replaces the table instead of appending to it.
    R.write_results_table(tmp_path, "run1", [_row("clean_acc", 0.8)])
    assert R.read_results_table(tmp_path, "run1").num_rows == 1
    (path.parent / "part-1.parquet").write_bytes(path.read_bytes())  # a stray part from an older writer
    R.write_results_table(tmp_path, "run1", [_row("clean_acc", 0.7)])
    assert sorted(p.name for p in path.parent.iterdir()) == ["part-0.parquet"]


def test_results_table_extra_columns_and_empty(tmp_path: Path) -> None:
    R.write_results_table(tmp_path, "run2", [_row(seed=0), _row(seed=1)])
    assert R.read_results_table(tmp_path, "run2").column("seed").to_pylist() == [0, 1]
    R.write_results_table(tmp_path, "run2", [])
    assert R.read_results_table(tmp_path, "run2").num_rows == 0


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"value": "0.5"}, "value.*number"),
        ({"value": True}, "value.*number"),
        ({"n_samples": 1.5}, "n_samples.*integer"),
        ({"n_samples": None}, "n_samples.*required"),
        ({"model": 3}, "model.*str"),
        ({"attack_params": "{not json"}, "attack_params.*JSON"),
        ({"run_id": "other"}, "run_id"),
        ({"created_at": "yesterday"}, "created_at"),
    ],
)
def test_results_table_rejects_bad_types(tmp_path: Path, override: dict, match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        R.write_results_table(tmp_path, "run1", [_row(), _row(**override)])
    assert not R.results_table_path(tmp_path, "run1").exists()


def test_results_table_disk_full_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    R.write_results_table(tmp_path, "run1", [_row("clean_acc", 0.9)])
    import errno

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(R.pq, "write_table", full)
    with pytest.raises(StorageError, match="no space left") as info:
        R.write_results_table(tmp_path, "run1", [_row("clean_acc", 0.1)])
    monkeypatch.undo()
    assert "part-0.parquet" in str(info.value)
    assert R.read_results_table(tmp_path, "run1").column("value").to_pylist() == [0.9]


def test_run_manifests(tmp_path: Path) -> None:
    assert R.list_runs(tmp_path) == []
    R.write_run_manifest(tmp_path, "run-b", {"config": {"eps": 8}, "seed": np.int64(3), "started": dt.date(2024, 1, 2)})
    R.write_run_manifest(tmp_path, "run-a", {"status": "running"})
    R.write_run_manifest(tmp_path, "run-a", {"status": "done"})
    assert R.list_runs(tmp_path) == ["run-a", "run-b"]
    assert R.read_run_manifest(tmp_path, "run-a") == {"run_id": "run-a", "status": "done"}
    assert R.read_run_manifest(tmp_path, "run-b")["seed"] == 3
    with pytest.raises(RunNotFoundError, match="run-c"):
        R.read_run_manifest(tmp_path, "run-c")
    with pytest.raises(SchemaError):
        R.write_run_manifest(tmp_path, "run-d", {"bad": object()})


def test_failure_records(tmp_path: Path) -> None:
    assert R.failures(tmp_path, "run1") == []
    R.mark_failed(tmp_path, "run1", "pgd-abc/none", 2, "RuntimeError: CUDA OOM")
    R.mark_failed(tmp_path, "run1", "pgd-abc/none", 2, "RuntimeError: again")
    R.mark_failed(tmp_path, "run1", "fgsm-x", 0, "x" * 50_000)
    R.mark_failed(tmp_path, "run2", "fgsm-x", 1, "other run")
    got = R.failures(tmp_path, "run1")
    assert [(f["unit_key"], f["shard"], f["attempts"]) for f in got] == [("fgsm-x", 0, 1), ("pgd-abc/none", 2, 2)]
    assert got[1]["error"] == "RuntimeError: again" and len(got[0]["error"]) < 21_000
    assert len(R.failures(tmp_path)) == 3
    assert R.clear_failed(tmp_path, "run1", "pgd-abc/none", 2)
    assert not R.clear_failed(tmp_path, "run1", "pgd-abc/none", 2)
    assert [f["unit_key"] for f in R.failures(tmp_path, "run1")] == ["fgsm-x"]
