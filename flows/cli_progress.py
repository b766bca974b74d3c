"""What ``equi run`` shows while it works: the start-up phases by name, then progress with rate and ETA.

On a terminal: rich bars (attack shards, defense shards) with throughput, elapsed and remaining time. Elsewhere (a
log file, CI, a scheduler's capture): one plain line per phase and per finished shard, with counts, rate and ETA, so
a log shows where a run is without a terminal. ``--quiet`` keeps only the plan line and the summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RateColumn(ProgressColumn):
    """Shards per minute, over the task's recent progress."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed * 60:.1f}/min" if speed else "-/min", style="progress.data.speed")


class ShardLog:
    """Plain progress lines (no terminal): one per finished shard, with counts, rate and ETA over all shards."""

    def __init__(self, console: Console, n_attack: int, n_defend: int, clock: Callable[[], float] = time.monotonic):
        self.console, self.clock = console, clock
        self.total = {"attack": n_attack, "defend": n_defend}
        self.done = {"attack": 0, "defend": 0}
        self.started = clock()
        self.first_done: float | None = None

    def line(self, kind: str) -> str:
        self.done[kind] += 1
        now = self.clock()
        finished, total = sum(self.done.values()), sum(self.total.values())
        # Rate from the first finished shard on: the start-up (cluster, model loading) is not shard work.
        if self.first_done is None:
            self.first_done = now
        span = now - self.first_done
        rate = (finished - 1) / span if finished > 1 and span > 0 else 0.0
        if finished >= total:
            eta = "eta 0:00"
        else:
            eta = f"eta {_duration((total - finished) / rate)}" if rate else "eta -"
        shown_rate = f"{rate * 60:.1f} shards/min" if rate else "- shards/min"
        return (
            f"{'attack' if kind == 'attack' else 'defense'} shard done: attack {self.done['attack']}/"
            f"{self.total['attack']}, defense {self.done['defend']}/{self.total['defend']} | {shown_rate} | "
            f"elapsed {_duration(now - self.started)}, {eta}"
        )

    def __call__(self, kind: str) -> None:
        self.console.print(self.line(kind), highlight=False, soft_wrap=True)


def run_with_progress(cfg: Any, quiet: bool, err_console: Console, launch: Any = None) -> Any:
    """``pipeline.run`` with progress shown; ``launch``: the run's start-up, begun by the caller."""
    from flows import pipeline, progress

    def on_phase(text: str) -> None:
        if not quiet:
            err_console.print(f"[dim]{escape(text)} ...[/]", highlight=False, soft_wrap=True)

    def plan_line(plan: Any) -> None:
        print_repaired(err_console, plan.repaired)
        err_console.print(
            f"{cfg.name}: {len(plan.attack_units)} attack shard(s) and {len(plan.defend_units)} defense shard(s) "
            f"to compute ({plan.total_defend - len(plan.defend_units)} already done)",
            highlight=False,
            soft_wrap=True,
        )

    progress.PHASE[0] = on_phase
    try:
        if quiet or not err_console.is_terminal:
            log: list[ShardLog] = []

            def on_plan(plan: Any) -> None:
                plan_line(plan)
                log.append(ShardLog(err_console, len(plan.attack_units), len(plan.defend_units)))

            def on_done(kind: str) -> None:
                if not quiet:
                    log[0](kind)

            return pipeline.run(cfg, on_plan=on_plan, on_done=on_done, launch=launch)
        return _with_bars(cfg, err_console, plan_line, launch)
    finally:
        progress.PHASE[0] = None


def _with_bars(cfg: Any, err_console: Console, plan_line: Callable[[Any], None], launch: Any) -> Any:
    from flows import pipeline

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        # No stdout/stderr proxies: Dask pickles task functions, and rich's proxies hold locks.
        redirect_stdout=False,
        redirect_stderr=False,
    )
    ids: dict[str, Any] = {}

    def on_plan(plan: Any) -> None:
        plan_line(plan)
        ids["attack"] = bars.add_task("attack shards ", total=len(plan.attack_units))
        ids["defend"] = bars.add_task("defense shards", total=len(plan.defend_units))

    def on_done(kind: str) -> None:
        bars.advance(ids[kind])

    with bars:
        return pipeline.run(cfg, on_plan=on_plan, on_done=on_done, launch=launch)


def print_repaired(err_console: Console, repaired: list[str]) -> None:
    for message in repaired:
        err_console.print(f"[bold yellow]damaged:[/] {escape(message)}", highlight=False, soft_wrap=True)
