"""Compare the numbers of two results directories: every per-image row and every results-table value, exactly.

The check of a pure refactor (a step that must change no number): run the same configs before and after the
change into two results directories, then

    python scripts/compare_runs.py BEFORE/results AFTER/results

Rows are matched by (run, unit, sample, shard) and (run, attack index, defense index, metric), where a unit is the
(attack, defense) pair's position in the run manifest's plan order: two defenses of one name (``equivariance`` with
``views: flip`` and with ``views: rotate15``) are two units. What identifies the code or the moment (storage keys,
code version, git sha, wall time, timestamps, package versions) is left out, everything else must be equal (NaN
equals NaN). Exit 0 when identical, 1 with the first differences.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

# Columns that name the code or the moment of a run, not its numbers.
VOLATILE = {"attack_key", "defense_key", "code_version", "git_sha", "wall_time_s", "created_at", "package_versions"}


def _partitions(path: Path) -> dict[str, str]:
    """``run_id``, ``attack_key``, ... of a file under ``name=value`` folders."""
    return dict(p.split("=", 1) for p in path.parts if "=" in p)


def _rows(files: Iterable[Path], unit_of: dict[tuple[str, str, str], int] | None) -> list[dict[str, Any]]:
    """The rows of ``files`` less the volatile columns; with ``unit_of``, per-image rows get their run id and unit."""
    out = []
    for path in files:
        part = _partitions(path)
        for row in pq.read_table(path).to_pylist():
            if unit_of is not None:
                row["run_id"] = part["run_id"]
                row["unit"] = unit_of.get((part["run_id"], part["attack_key"], part["defense_key"]), -1)
            out.append({k: v for k, v in row.items() if k not in VOLATILE})
    return out


def unit_positions(results_dir: Path) -> dict[tuple[str, str, str], int]:
    """(run id, attack key, defense key) -> the unit's position in its run manifest's list of planned units."""
    out = {}
    for manifest in sorted(results_dir.glob("runs/*.json")):
        run = json.loads(manifest.read_text())
        for i, unit in enumerate(run.get("units", [])):
            out[(run["run_id"], unit["attack_key"], unit["defense_key"])] = i
    return out


def per_image_rows(results_dir: Path) -> dict[tuple, dict[str, Any]]:
    rows = _rows(sorted(results_dir.glob("samples/*/*/*/*.parquet")), unit_positions(results_dir))
    return {(r["run_id"], r["unit"], r["sample_id"], r["shard"]): r for r in rows}


def table_rows(results_dir: Path) -> dict[tuple, dict[str, Any]]:
    rows = _rows(sorted(results_dir.glob("results/*/*.parquet")), None)
    return {
        (r["run_id"], r["attack_index"], r["defense_index"], r["attack"], r["defense"], r["metric"]): r for r in rows
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def differences(before: dict[tuple, dict], after: dict[tuple, dict], what: str) -> list[str]:
    out = [f"{what} {key}: only before" for key in sorted(before.keys() - after.keys(), key=str)]
    out += [f"{what} {key}: only after" for key in sorted(after.keys() - before.keys(), key=str)]
    for key in sorted(before.keys() & after.keys(), key=str):
        for column in sorted(before[key].keys() | after[key].keys()):
            a, b = before[key].get(column), after[key].get(column)
            if not same(a, b):
                out.append(f"{what} {key} {column}: {a!r} before, {b!r} after")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="results directory of the run before the change")
    parser.add_argument("after", type=Path, help="results directory of the same configs after it")
    args = parser.parse_args(argv)
    images_before, images_after = per_image_rows(args.before), per_image_rows(args.after)
    tables_before, tables_after = table_rows(args.before), table_rows(args.after)
    if not images_before or not tables_before:
        print(f"{args.before}: no per-image rows or results table found", file=sys.stderr)
        return 2
    problems = differences(images_before, images_after, "image") + differences(tables_before, tables_after, "table")
    if problems:
        print(f"{len(problems)} difference(s); the first ones:", *problems[:20], sep="\n")
        return 1
    runs = sorted({k[0] for k in tables_before})
    print(
        f"identical: {len(images_before)} per-image rows and {len(tables_before)} results-table rows over runs {runs}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
