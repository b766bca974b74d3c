"""``equi tune CONFIG``: the command's body (the search itself is :mod:`flows.tune`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_tune(config: Path, *, in_process: bool, quiet: bool, console: Any) -> None:
    from flows.tune import TuneRunFailed, tune
    from tasks.tune_config import load_tune_config

    spec = load_tune_config(config, in_process=in_process)

    def log(line: str) -> None:
        if not quiet:
            console.print(line, highlight=False, soft_wrap=True, markup=False)

    try:
        result = tune(spec, log=log)
    except TuneRunFailed as e:  # not bad input: exit 1, like `equi run` with failed shards
        import typer

        console.print(f"error: {e}", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(1) from None
    c = result.cost
    chosen = result.chosen
    console.print(
        f"chosen: candidate {chosen.number} ({chosen.label})\n"
        f"front: {result.front_path}\nplot: {result.plot_path}\npreset: {result.preset_path}\n"
        f"cost: {c.runs} runs ({c.shards_computed} unit-shards computed, {c.shards_skipped} already done), "
        f"{c.image_passes:,.0f} image passes computed, {c.seconds:.1f} s wall\n"
        f"Evaluate the preset ONCE on the test split: equi run {result.preset_path}",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )
