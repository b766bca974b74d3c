"""Parquet results: per-shard sample tables with embedded metric state, the reduced long table, run records.

On-disk layout (``results_dir`` is the results directory)::

    samples/run_id=<run>/attack_key=<a>/defense_key=<d>/shard=00003.parquet   one file per unit shard, write-once
    results/run_id=<run>/part-0.parquet                                        reduced long table, replaced whole
    runs/<run>.json                                                            run manifest
    failures/run_id=<run>/<unit_key>.shard=00003.json                          last error of a failed shard

Every file is written to a hidden temp name in its directory and renamed into place, so readers and DuckDB globs
never see a partial file. The metric state of a shard lives in the Parquet schema metadata of the same file
(exact JSON encoding from `storage.state`, with a sha256), so table and state are committed together. Pages are
written with CRC checksums, verified on read.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path, atomic_write_json, is_temp_name
from .errors import ResultCorruptError, RunNotFoundError, SchemaError, StorageError
from .faults import fault_point
from .keys import canonical_json, safe_component
from .state import dumps_state, loads_state, state_sha256

__all__ = [
    "RESULTS_SCHEMA",
    "clear_failed",
    "discard_shard",
    "failures",
    "list_runs",
    "list_shards",
    "mark_failed",
    "read_results_table",
    "read_run_manifest",
    "read_shard",
    "read_shard_unit",
    "results_table_path",
    "shard_done",
    "shard_path",
    "write_results_table",
    "write_run_manifest",
    "write_shard",
]

FORMAT_VERSION = "1"
_META_PREFIX = b"equirobust."
_STATE_INLINE_MAX = 64 << 10  # larger state is zlib-compressed (then base64, metadata values must be text)
_ERROR_MAX_CHARS = 20_000

RESULTS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("config_hash", pa.string()),
        pa.field("git_sha", pa.string()),
        pa.field("package_versions", pa.string()),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("attack", pa.string(), nullable=False),
        pa.field("attack_params", pa.string()),
        pa.field("defense", pa.string(), nullable=False),
        pa.field("defense_params", pa.string()),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("n_samples", pa.int64(), nullable=False),
        pa.field("wall_time_s", pa.float64()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
_JSON_COLUMNS = {"package_versions", "attack_params", "defense_params"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------------------------------------- per-shard samples
def shard_path(results_dir: str | Path, run_id: str, attack_key: str, defense_key: str, shard: int) -> Path:
    """Deterministic path of one unit shard's sample table."""
    if isinstance(shard, bool) or not isinstance(shard, int | np.integer) or shard < 0:
        raise ValueError(f"shard must be a non-negative int, got {shard!r}")
    return (
        Path(results_dir)
        / "samples"
        / f"run_id={safe_component(run_id, 'run id')}"
        / f"attack_key={safe_component(attack_key, 'attack key')}"
        / f"defense_key={safe_component(defense_key, 'defense key')}"
        / f"shard={int(shard):05d}.parquet"
    )


def _unit_fields(unit: Mapping[str, Any]) -> tuple[str, str, int]:
    missing = [k for k in ("attack_key", "defense_key", "shard") if k not in unit]
    if missing:
        raise SchemaError(f"unit is missing {missing}; got keys {sorted(unit)}")
    return unit["attack_key"], unit["defense_key"], unit["shard"]


def _samples_table(samples: Sequence[Mapping[str, Any]] | pa.Table, partition: Mapping[str, Any]) -> pa.Table:
    if isinstance(samples, pa.Table):
        table = samples
    else:
        try:
            table = pa.Table.from_pylist([dict(s) for s in samples])
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise SchemaError(f"sample rows cannot be converted to a table: {exc}") from exc
    table = table.replace_schema_metadata(None)
    # Partition values come from the path (DuckDB's hive partitioning overrides same-named file columns), so a
    # column with the same name must agree with them rather than be silently shadowed.
    for name, value in partition.items():
        if name in table.column_names:
            values = set(table.column(name).to_pylist())
            if values - {value}:
                raise SchemaError(
                    f"samples column {name!r} has values {sorted(map(str, values))[:5]}, "
                    f"but this file is for {name}={value!r}"
                )
    if "shard" not in table.column_names:
        table = table.append_column("shard", pa.array([partition["shard"]] * table.num_rows, pa.int64()))
    return table


def _encode_state_meta(state: Mapping[str, Any]) -> dict[bytes, bytes]:
    raw = dumps_state(dict(state))
    if len(raw) > _STATE_INLINE_MAX:
        payload, encoding = base64.b64encode(zlib.compress(raw, 6)), b"json+zlib+base64"
    else:
        payload, encoding = raw, b"json"
    return {
        b"equirobust.state": payload,
        b"equirobust.state_encoding": encoding,
        b"equirobust.state_sha256": state_sha256(raw).encode(),
    }


def _decode_state_meta(meta: Mapping[bytes, bytes], path: Path) -> dict[str, Any]:
    try:
        if meta.get(b"equirobust.format") != FORMAT_VERSION.encode():
            raise ValueError(f"missing or unknown format marker {meta.get(b'equirobust.format')!r}")
        payload, encoding = meta[b"equirobust.state"], meta[b"equirobust.state_encoding"]
        raw = zlib.decompress(base64.b64decode(payload, validate=True)) if encoding == b"json+zlib+base64" else payload
        if state_sha256(raw) != meta[b"equirobust.state_sha256"].decode():
            raise ValueError("metric state checksum mismatch")
        state = loads_state(raw)
    except (KeyError, ValueError, zlib.error, UnicodeDecodeError) as exc:
        raise ResultCorruptError(
            f"result file {path} has unreadable metric state: {exc}; delete and recompute it", path=str(path)
        ) from exc
    if not isinstance(state, dict):
        raise ResultCorruptError(f"result file {path}: metric state is not a dict", path=str(path))
    return state


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ResultCorruptError(
            f"result file {path} is unreadable ({exc}); delete and recompute it", path=str(path)
        ) from exc


def read_shard(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    """(sample table, metric state) of a shard file; ResultCorruptError if truncated/garbled/checksum mismatch."""
    path = Path(path)
    pf = _open_parquet(path)
    meta = pf.schema_arrow.metadata or {}
    state = _decode_state_meta(meta, path)
    try:
        table = pf.read()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ResultCorruptError(
            f"result file {path} has corrupt pages ({exc}); delete and recompute it", path=str(path)
        ) from exc
    expected_rows = meta.get(b"equirobust.n_rows")
    if expected_rows is not None and int(expected_rows) != table.num_rows:
        raise ResultCorruptError(
            f"result file {path} has {table.num_rows} rows, expected {int(expected_rows)}", path=str(path)
        )
    keep = {k: v for k, v in (table.schema.metadata or {}).items() if not k.startswith(_META_PREFIX)}
    return table.replace_schema_metadata(keep or None), state


def read_shard_unit(path: str | Path) -> dict[str, Any]:
    """The unit dict (and run id under "run_id") recorded in a shard file's footer, without reading pages."""
    path = Path(path)
    meta = _open_parquet(path).schema_arrow.metadata or {}
    try:
        unit = json.loads(meta[b"equirobust.unit"])
        unit.setdefault("run_id", meta[b"equirobust.run_id"].decode())
        return unit
    except (KeyError, ValueError) as exc:
        raise ResultCorruptError(f"result file {path} has no readable unit record ({exc})", path=str(path)) from exc


def write_shard(
    results_dir: str | Path,
    run_id: str,
    unit: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]] | pa.Table,
    state: Mapping[str, Any],
) -> Path:
    """Write one unit shard's per-sample rows and metric state; write-once.

    `unit` must hold "attack_key", "defense_key" and "shard" (other JSON-able fields are recorded in the footer).
    If a valid file already exists it is kept and its path returned; a corrupt one is replaced.
    """
    attack_key, defense_key, shard = _unit_fields(unit)
    path = shard_path(results_dir, run_id, attack_key, defense_key, shard)
    if path.exists():
        try:
            read_shard(path)
            return path
        except (ResultCorruptError, FileNotFoundError):
            pass  # recompute below; the atomic replace swaps the bad file out
    partition = {"run_id": run_id, "attack_key": attack_key, "defense_key": defense_key, "shard": int(shard)}
    table = _samples_table(samples, partition)
    try:
        unit_json = canonical_json(unit)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"unit is not JSON-serialisable: {exc}") from exc
    meta = {
        b"equirobust.format": FORMAT_VERSION.encode(),
        b"equirobust.run_id": run_id.encode(),
        b"equirobust.unit": unit_json.encode(),
        b"equirobust.n_rows": str(table.num_rows).encode(),
        **_encode_state_meta(state),
    }
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp), compression="zstd", write_page_checksum=True)
        fault_point("parquet", int(shard), partial=tmp)
    return path


def shard_done(results_dir: str | Path, run_id: str, attack_key: str, defense_key: str, shard: int) -> bool:
    """True if the shard file exists with a readable footer and intact metric state (pages are not read)."""
    path = shard_path(results_dir, run_id, attack_key, defense_key, shard)
    try:
        _decode_state_meta(_open_parquet(path).schema_arrow.metadata or {}, path)
    except (FileNotFoundError, ResultCorruptError):
        return False
    return True


def discard_shard(path: str | Path) -> bool:
    """Delete a (corrupt) shard file so it is recomputed; True if it existed."""
    try:
        Path(path).unlink()
    except FileNotFoundError:
        return False
    return True


def list_shards(results_dir: str | Path, run_id: str) -> list[Path]:
    """All committed shard files of a run, sorted by path (temp files excluded)."""
    base = Path(results_dir) / "samples" / f"run_id={safe_component(run_id, 'run id')}"
    if not base.is_dir():
        return []
    return sorted(p for p in base.glob("attack_key=*/defense_key=*/shard=*.parquet") if not is_temp_name(p.name))


# ---------------------------------------------------------------------------------------------- reduced table
def results_table_path(results_dir: str | Path, run_id: str) -> Path:
    """Path of the reduced long table of a run."""
    return Path(results_dir) / "results" / f"run_id={safe_component(run_id, 'run id')}" / "part-0.parquet"


def _json_cell(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return canonical_json(json.loads(value))
        except ValueError as exc:
            raise SchemaError(f"{where}: not valid JSON ({exc})") from exc
    try:
        return canonical_json(value)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"{where}: {exc}") from exc


def _number(value: Any, where: str, *, integer: bool) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise SchemaError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if integer:
        if isinstance(value, float | np.floating):
            if not float(value).is_integer():
                raise SchemaError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _timestamp(value: Any, where: str) -> dt.datetime:
    if value is None:
        return _now()
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError as exc:
            raise SchemaError(f"{where}: not an ISO timestamp: {value!r}") from exc
    if not isinstance(value, dt.datetime):
        raise SchemaError(f"{where}: expected a datetime or ISO string, got {type(value).__name__}")
    # Naive datetimes are taken as UTC so every row has the same, comparable time zone.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _coerce_row(row: Mapping[str, Any], i: int, run_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in RESULTS_SCHEMA:
        name = field.name
        where = f"results row {i}, column {name!r}"
        value = row.get(name)
        if name == "run_id":
            if value is not None and value != run_id:
                raise SchemaError(f"{where}: {value!r} does not match run id {run_id!r}")
            value = run_id
        elif name in _JSON_COLUMNS:
            value = _json_cell(value, where)
        elif name == "created_at":
            value = _timestamp(value, where)
        elif pa.types.is_floating(field.type):
            value = _number(value, where, integer=False)
        elif pa.types.is_integer(field.type):
            value = _number(value, where, integer=True)
        elif value is not None and not isinstance(value, str):
            raise SchemaError(f"{where}: expected str, got {type(value).__name__} {value!r}")
        if value is None and not field.nullable:
            raise SchemaError(f"{where}: required, got nothing")
        out[name] = value
    return out


def write_results_table(results_dir: str | Path, run_id: str, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write the reduced long table of a run, replacing any previous one (re-running a reduce never duplicates).

    Required columns are coerced to `RESULTS_SCHEMA` (dict params become canonical JSON strings, numbers must be
    numbers, `created_at` defaults to now in UTC); extra columns are kept with inferred types.
    """
    path = results_table_path(results_dir, run_id)
    known = set(RESULTS_SCHEMA.names)
    coerced = [_coerce_row(r, i, run_id) for i, r in enumerate(rows)]
    extras = sorted({k for r in rows for k in r} - known)
    arrays = [pa.array([r[f.name] for r in coerced], type=f.type) for f in RESULTS_SCHEMA]
    fields = list(RESULTS_SCHEMA)
    for name in extras:
        try:
            arr = pa.array([r.get(name) for r in rows])
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise SchemaError(f"results column {name!r} has inconsistent values: {exc}") from exc
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp), compression="zstd", write_page_checksum=True)
        fault_point("results-parquet", 0, partial=tmp)
    # Parts from an older writer would be unioned by the glob; the fresh part-0 is the whole table.
    for other in path.parent.glob("*.parquet"):
        if other.name != path.name:
            with contextlib.suppress(FileNotFoundError):
                other.unlink()
    return path


def read_results_table(results_dir: str | Path, run_id: str) -> pa.Table:
    """The reduced long table of a run (ResultCorruptError if unreadable, FileNotFoundError if absent)."""
    path = results_table_path(results_dir, run_id)
    pf = _open_parquet(path)
    try:
        return pf.read()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ResultCorruptError(f"results table {path} is corrupt ({exc})", path=str(path)) from exc


# ---------------------------------------------------------------------------------------------- run manifests
def _manifest_path(results_dir: str | Path, run_id: str) -> Path:
    return Path(results_dir) / "runs" / f"{safe_component(run_id, 'run id')}.json"


def write_run_manifest(results_dir: str | Path, run_id: str, manifest: Mapping[str, Any]) -> Path:
    """Atomically write (replace) `runs/<run_id>.json`; "run_id" is added to the manifest if absent."""
    body = {"run_id": run_id, **dict(manifest)}
    if body["run_id"] != run_id:
        raise SchemaError(f"manifest run_id {body['run_id']!r} does not match {run_id!r}")
    try:
        return atomic_write_json(_manifest_path(results_dir, run_id), body)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"run manifest for {run_id!r} is not JSON-serialisable: {exc}") from exc


def read_run_manifest(results_dir: str | Path, run_id: str) -> dict[str, Any]:
    """The manifest of a run; RunNotFoundError if there is none, StorageError if it is unreadable."""
    path = _manifest_path(results_dir, run_id)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = list_runs(results_dir)
        raise RunNotFoundError(f"no run {run_id!r} under {Path(results_dir) / 'runs'} (known: {known[:10]})") from None
    except (OSError, ValueError) as exc:
        raise StorageError(f"run manifest {path} is unreadable: {exc}") from exc


def list_runs(results_dir: str | Path) -> list[str]:
    """Run ids with a manifest, sorted."""
    base = Path(results_dir) / "runs"
    if not base.is_dir():
        return []
    return sorted(p.stem for p in base.glob("*.json") if not is_temp_name(p.name))


# ---------------------------------------------------------------------------------------------- failures
def _unit_file_stem(unit_key: str) -> str:
    try:
        return safe_component(unit_key, "unit key")
    except ValueError:
        # Arbitrary unit keys (e.g. "attack/defense") still get a stable, safe file name.
        return "u-" + hashlib.sha256(unit_key.encode()).hexdigest()[:16]


def _failure_path(results_dir: str | Path, run_id: str, unit_key: str, shard: int) -> Path:
    if isinstance(shard, bool) or not isinstance(shard, int | np.integer) or shard < 0:
        raise ValueError(f"shard must be a non-negative int, got {shard!r}")
    return (
        Path(results_dir)
        / "failures"
        / f"run_id={safe_component(run_id, 'run id')}"
        / f"{_unit_file_stem(unit_key)}.shard={int(shard):05d}.json"
    )


def mark_failed(results_dir: str | Path, run_id: str, unit_key: str, shard: int, error: str) -> Path:
    """Record (or update, counting attempts) the failure of one unit shard."""
    path = _failure_path(results_dir, run_id, unit_key, shard)
    now = _now().isoformat(timespec="seconds")
    previous: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads(path.read_text(encoding="utf-8"))
    text = str(error)
    if len(text) > _ERROR_MAX_CHARS:
        text = text[: _ERROR_MAX_CHARS // 2] + "\n...[truncated]...\n" + text[-_ERROR_MAX_CHARS // 2 :]
    record = {
        "run_id": run_id,
        "unit_key": unit_key,
        "shard": int(shard),
        "error": text,
        "attempts": int(previous.get("attempts", 0)) + 1,
        "first_failed_at": previous.get("first_failed_at", now),
        "last_failed_at": now,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    return atomic_write_json(path, record)


def clear_failed(results_dir: str | Path, run_id: str, unit_key: str, shard: int) -> bool:
    """Remove a failure record (after the shard succeeded); True if one existed."""
    try:
        _failure_path(results_dir, run_id, unit_key, shard).unlink()
    except FileNotFoundError:
        return False
    return True


def failures(results_dir: str | Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """Failure records of a run (or of all runs if `run_id` is None), sorted by (run, unit key, shard)."""
    base = Path(results_dir) / "failures"
    pattern = f"run_id={safe_component(run_id, 'run id')}/*.json" if run_id is not None else "run_id=*/*.json"
    out: list[dict[str, Any]] = []
    for p in base.glob(pattern) if base.is_dir() else []:
        if is_temp_name(p.name):
            continue
        try:
            out.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            # Surface an unreadable record rather than hiding a failure.
            out.append(
                {
                    "run_id": p.parent.name.removeprefix("run_id="),
                    "unit_key": p.stem,
                    "shard": -1,
                    "error": f"unreadable failure record {p}: {exc}",
                    "attempts": 0,
                }
            )
    return sorted(out, key=lambda r: (str(r.get("run_id")), str(r.get("unit_key")), int(r.get("shard", -1))))
