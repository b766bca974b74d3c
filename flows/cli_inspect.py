"""The bodies of ``equi status`` and ``equi query`` (the commands themselves are in :mod:`flows.cli`).

Both only read: a run's manifest, its shard files and its lock (``status``), or the Parquet results through the
read-only DuckDB of :mod:`storage.query`. Errors are raised (StorageError, EquirobustError) for the CLI's guard to
print as one line.
"""

from __future__ import annotations

import csv
import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from storage.run_store import RunStore

QUERY_FORMATS = ("table", "csv", "json")
_RUN_COLUMNS = ("run_id", "status", "done", "failed", "pending", "updated_at")


# ------------------------------------------------------------------------------------------------ status
def run_rows(results_dir: str) -> list[dict[str, Any]]:
    """One row per run: its state (a "running" run whose lock nobody holds is "interrupted") and shard counts."""
    rows = []
    for store in RunStore.all_in(results_dir):
        st = store.status()
        units = st["units"]
        first = next((f for u in units for f in u["failed"]), None)  # its error names the unit
        rows.append(
            {
                "run_id": store.run_id,
                "status": st["state"],
                "done": sum(u["done"] for u in units),
                "failed": sum(len(u["failed"]) for u in units),
                "pending": sum(u["pending"] for u in units),
                "updated_at": st["manifest"].get("updated_at"),
                # why it failed, at a glance (`equi status RUN` lists every failed shard)
                "first_error": f"shard {first['shard']}, {first['error']}" if first else None,
            }
        )
    return rows


def print_runs(console: Console, results_dir: str, as_json: bool) -> None:
    rows = run_rows(results_dir)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    t = Table(title=f"runs in {results_dir}")
    for col in _RUN_COLUMNS:
        t.add_column(col, no_wrap=True)  # a run id is what the user copies into `equi resume`: never shortened
    cells = [[str(r[c]) for c in _RUN_COLUMNS] for r in rows]
    for row in cells:
        t.add_row(*row)
    if not rows:
        console.print(f"no runs in {results_dir}")
        return
    print_whole(console, t, cells)
    for r in rows:
        if r["status"] == "interrupted":
            console.print(f"interrupted: {r['run_id']}; `equi resume {r['run_id']}` finishes it", highlight=False)
        if r["failed"] and r["first_error"]:
            console.print(
                f"failed: {r['run_id']}: {r['failed']} shard(s), first {r['first_error']}; `equi status {r['run_id']}` "
                f"lists them, `equi resume {r['run_id']}` recomputes them once the cause is fixed",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )


def print_whole(console: Console, table: Table, rows: list[list[str]]) -> None:
    """Print ``table`` at its natural width even on a narrow terminal (which then wraps lines): a table squeezed
    to fit would shorten run ids and hide columns. ``rows``: its cells as text, to measure it."""
    widths = [max([len(str(c.header)), *(len(r[i]) for r in rows)]) for i, c in enumerate(table.columns)]
    natural = sum(widths) + 3 * len(widths) + 1  # one space either side of a cell, and the borders
    if natural <= console.width:
        console.print(table)
        return
    # Console.print caps its width at the console's; a console of the table's width on the same stream does not.
    wide = Console(file=console.file, width=natural, force_terminal=console.is_terminal, no_color=console.no_color)
    wide.print(table, crop=False)


def state_line(run_id: str, state: str, holder: dict[str, Any] | None) -> str | None:
    """What a run's state means and what to do about it (None for a complete run)."""
    if state == "interrupted":
        return (
            f"interrupted: the process that ran {run_id} is gone (killed, or its machine went down) and no process "
            f"holds its lock; `equi resume {run_id}` computes only what is missing"
        )
    if state == "running" and holder:
        since = f" since {holder['started_at']}" if holder.get("started_at") else ""
        return f"running: pid {holder.get('pid')} on {holder.get('host')}{since}"
    if state == "failed":
        return f"failed: fix the cause of the failed shards below, then `equi resume {run_id}` recomputes only those"
    return None


def weights_line(manifest: dict[str, Any]) -> str | None:
    """The model's weights as the manifest records them (runs before this record existed have none)."""
    w = manifest.get("weights")
    if not isinstance(w, dict):
        return None
    where = "random init (checkpoint: none)" if w.get("checkpoint") == "none" else str(w.get("checkpoint"))
    kind = " (shipped)" if w.get("shipped") else ""
    line = f"model {w.get('model')}: weights {where}{kind}, weights digest sha256:{w.get('weights_digest')}"
    if w.get("code"):  # a factory or file model: the code (or program) the cache keys hold
        line += f"; code {w['code']}" + (f" ({w['factory_file']})" if w.get("factory_file") else "")
    return line


def print_run_status(console: Console, results_dir: str, run_id: str, as_json: bool) -> None:
    st = RunStore(results_dir, run_id).status()
    if as_json:
        console.print_json(json.dumps(st["units"], default=str))
        return
    m = st["manifest"]
    # The run id on a line of its own, not in a title rich would wrap mid-id.
    console.print(f"{run_id} ({st['state']}, {m.get('n_samples')} samples, {m.get('n_shards')} shards)", soft_wrap=True)
    t = Table()
    for col in ("attack", "defense", "done", "failed", "pending"):
        t.add_column(col, no_wrap=True)
    cells = [[u["attack"], u["defense"], str(u["done"]), str(len(u["failed"])), str(u["pending"])] for u in st["units"]]
    for row in cells:
        t.add_row(*row)
    print_whole(console, t, cells)
    for line in (state_line(run_id, st["state"], st["holder"]), weights_line(m)):
        if line:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    for u in st["units"]:
        for f in u["failed"]:
            console.print(
                f"failed: {u['attack']} / {u['defense']} shard {f['shard']} "
                f"(attempts {f.get('attempts')}): {f['error']}",
                highlight=False,
                markup=False,
            )


# ------------------------------------------------------------------------------------------------ query
def print_query(
    console: Console,
    results_dir: str,
    sql: str,
    fmt: str,
    timeout_s: float | None,
    max_rows: int | None,
    memory_limit: str,
) -> None:
    """Run one read-only statement with its limits (None: none) and print the rows as ``fmt``."""
    from storage.query import query

    table = query(results_dir, sql, timeout_s=timeout_s, max_rows=max_rows, memory_limit=memory_limit)
    rows = table.to_pylist()
    if fmt == "json":
        console.print_json(json.dumps(rows, default=str))
    elif fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(table.column_names)
        for r in rows:
            w.writerow([r[c] for c in table.column_names])
    else:
        t = Table()
        for c in table.column_names:
            t.add_column(c)
        for r in rows:
            t.add_row(*(f"{v:.4f}" if isinstance(v, float) else escape(str(v)) for v in r.values()))
        console.print(t)
