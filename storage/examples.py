"""Parquet examples for the report's Figure-2 grid: images and predictions of a run's first few samples.

On-disk layout (next to ``samples/``, which it mirrors)::

    examples/run_id=<run>/attack_key=<a>/defense_key=<d>/shard=00000.parquet

One file per unit shard that holds at least one example sample, written atomically BEFORE the shard's sample file
(the sample file is the shard's done marker), so a completed shard never lacks its examples. Images and label maps
are PNG bytes (uint8; uint16 for label maps of more than 255 classes), so the files stay small and the report needs
nothing else. The columns are fixed by :data:`EXAMPLES_SCHEMA`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path, is_temp_name
from .errors import ResultCorruptError, SchemaError
from .keys import safe_component

__all__ = [
    "EXAMPLE_STATES",
    "EXAMPLES_SCHEMA",
    "examples_path",
    "list_example_files",
    "read_examples",
    "write_examples",
]

EXAMPLE_STATES = ("clean", "attacked", "restored")  # the grid's rows per sample


def _state_fields(state: str) -> list[pa.Field]:
    return [
        pa.field(f"{state}_image", pa.binary()),  # PNG, H x W (gray) or H x W x 3
        pa.field(f"{state}_pred", pa.int64()),  # the class (classification); -1 for dense tasks
        pa.field(f"{state}_pred_map", pa.binary()),  # PNG label map (segmentation, instance); null otherwise
        pa.field(f"{state}_view_preds", pa.list_(pa.int64())),  # per view: class of g x (classification)
        pa.field(f"{state}_view_pred_maps", pa.list_(pa.binary())),  # per view: PNG of argmax g^-1 F(g x)
    ]


EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field("position", pa.int64(), nullable=False),  # the sample's position in the run's sample order
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("shard", pa.int64(), nullable=False),
        pa.field("attack", pa.string(), nullable=False),
        pa.field("defense", pa.string(), nullable=False),
        pa.field("attack_key", pa.string(), nullable=False),
        pa.field("defense_key", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("label", pa.int64()),  # the class (classification); -1 for dense tasks
        pa.field("label_map", pa.binary()),  # PNG ground-truth label map (dense tasks)
        pa.field("ignore_label", pa.int64()),  # value of unlabelled / unseen pixels in the label maps
        pa.field("view_names", pa.list_(pa.string())),  # e.g. "hflip", "resize 21x21", "rotate +7"
        *[f for s in EXAMPLE_STATES for f in _state_fields(s)],
    ]
)


def examples_path(results_dir: str | Path, run_id: str, attack_key: str, defense_key: str, shard: int) -> Path:
    """Deterministic path of one unit shard's examples."""
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise ValueError(f"shard must be a non-negative int, got {shard!r}")
    return (
        Path(results_dir)
        / "examples"
        / f"run_id={safe_component(run_id, 'run id')}"
        / f"attack_key={safe_component(attack_key, 'attack key')}"
        / f"defense_key={safe_component(defense_key, 'defense key')}"
        / f"shard={int(shard):05d}.parquet"
    )


def write_examples(
    results_dir: str | Path, run_id: str, unit: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
) -> Path:
    """Atomically write (replace) one unit shard's example rows; ``unit`` holds attack_key, defense_key, shard."""
    missing = [k for k in ("attack_key", "defense_key", "shard") if k not in unit]
    if missing:
        raise SchemaError(f"unit is missing {missing}; got keys {sorted(unit)}")
    a_key, d_key, shard = unit["attack_key"], unit["defense_key"], int(unit["shard"])
    path = examples_path(results_dir, run_id, a_key, d_key, shard)
    full = [{**dict(r), "attack_key": a_key, "defense_key": d_key, "shard": shard} for r in rows]
    unknown = sorted({k for r in full for k in r} - set(EXAMPLES_SCHEMA.names))
    if unknown:
        raise SchemaError(f"example rows have unknown columns {unknown}")
    try:
        table = pa.Table.from_pylist(full, schema=EXAMPLES_SCHEMA)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise SchemaError(f"example rows cannot be converted to a table: {exc}") from exc
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp), compression="zstd", write_page_checksum=True)
    return path


def list_example_files(results_dir: str | Path, run_id: str) -> list[Path]:
    """All committed example files of a run, sorted by path."""
    base = Path(results_dir) / "examples" / f"run_id={safe_component(run_id, 'run id')}"
    if not base.is_dir():
        return []
    return sorted(p for p in base.glob("attack_key=*/defense_key=*/shard=*.parquet") if not is_temp_name(p.name))


def read_examples(results_dir: str | Path, run_id: str) -> pa.Table:
    """Every example row of a run (empty table with :data:`EXAMPLES_SCHEMA` if none), sorted by (attack_key,
    defense_key, position); ResultCorruptError names an unreadable file."""
    tables = []
    for path in list_example_files(results_dir, run_id):
        try:
            tables.append(pq.ParquetFile(path, page_checksum_verification=True).read().cast(EXAMPLES_SCHEMA))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ResultCorruptError(f"examples file {path} is unreadable ({exc})", path=str(path)) from exc
    if not tables:
        return EXAMPLES_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    return table.sort_by([("attack_key", "ascending"), ("defense_key", "ascending"), ("position", "ascending")])
