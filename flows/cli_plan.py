"""The body of ``equi run --dry-run``: the plan and its estimated cost as a table (:mod:`flows.dry_run`)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.cli_inspect import print_whole
from tasks.config import RunConfig


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _count(n: float) -> str:
    return f"{n:,.0f}"


def print_dry_run(console: Console, cfg: RunConfig) -> None:
    from flows.dry_run import dry_run

    plan = dry_run(cfg)
    console.print(
        f"run {plan['run_id']}: {plan['n_samples']} samples in {plan['n_shards']} shard(s); "
        f"{plan['units_to_compute']} unit-shard(s) to compute, {plan['units_done']} done or cached",
        highlight=False,
        soft_wrap=True,
    )
    t = Table(title="plan (dry run: nothing computed or written)")
    for col, justify in (
        ("unit", "left"),
        ("shards done", "right"),
        ("to compute", "right"),
        ("passes / image", "right"),
        ("passes to compute", "right"),
    ):
        t.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    cells = [
        [
            r["what"],
            str(r["shards_done"]),
            str(r["shards_to_compute"]),
            _count(r["passes_per_image"]),
            _count(r["passes_to_compute"]),
        ]
        for r in plan["rows"]
    ]
    for row in cells:
        t.add_row(escape(row[0]), *row[1:])
    print_whole(console, t, cells)
    total = plan["passes_to_compute"]
    line = f"total: {_count(total)} image passes (forward + backward of the model on one image or view; an upper bound)"
    if "seconds_per_pass" in plan:
        per = plan["seconds_per_pass"]
        line += (
            f"; one pass took {per * 1000:.1f} ms per image here, so about {_human(per * total)} in one process "
            "(divide by the number of workers)"
        )
    console.print(line, highlight=False, soft_wrap=True)
