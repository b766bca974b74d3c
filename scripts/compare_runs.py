"""Compare the numbers of two results directories: every per-image row and every results-table value, exactly.

The check of a pure refactor (a step that must change no number): run the same configs before and after the
change into two results directories, then

    python scripts/compare_runs.py BEFORE/results AFTER/results

Rows are matched by (run, attack, defense, sample, shard) and (run, attack index, defense index, metric); what
identifies the code or the moment (storage keys, code version, git sha, wall time, timestamps, package versions)
is left out, everything else must be equal (NaN equals NaN). Exit 0 when identical, 1 with the first differences.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

# Columns that name the code or the moment of a run, not its numbers.
VOLATILE = {"attack_key", "defense_key", "code_version", "git_sha", "wall_time_s", "created_at", "package_versions"}


def _rows(files: Iterable[Path], partition_run: bool) -> list[dict[str, Any]]:
    out = []
    for path in files:
        run_id = next(p.split("=", 1)[1] for p in path.parts if p.startswith("run_id="))
        for row in pq.read_table(path).to_pylist():
            if partition_run:
                row["run_id"] = run_id
            out.append({k: v for k, v in row.items() if k not in VOLATILE})
    return out


def per_image_rows(results_dir: Path) -> dict[tuple, dict[str, Any]]:
    rows = _rows(sorted(results_dir.glob("samples/*/*/*/*.parquet")), partition_run=True)
    return {(r["run_id"], r["attack"], r["defense"], r["sample_id"], r["shard"]): r for r in rows}


def table_rows(results_dir: Path) -> dict[tuple, dict[str, Any]]:
    rows = _rows(sorted(results_dir.glob("results/*/*.parquet")), partition_run=False)
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
