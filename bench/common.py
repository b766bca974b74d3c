"""Pieces the pipeline benches share: the long-lived Prefect server a nightly setup keeps, and how a bench ends."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def long_lived_server(results_dir: Path) -> Iterator[Any]:
    """An ``equi server`` for ``results_dir`` for the block (started untimed, stopped after); refused when a Prefect
    API is configured, since every run would then use that one instead."""
    from flows.prefect_api import configured_api_url
    from flows.prefect_server import start_server, stop_server

    if configured_api_url():
        raise SystemExit("a Prefect API is configured (PREFECT_API_URL or the active profile): unset it")
    print(f"starting a long-lived Prefect server for {results_dir} (not timed) ...", flush=True)
    server, _ = start_server(results_dir)
    try:
        yield server
    finally:
        stop_server(results_dir)


def finish(out: dict[str, Any], json_out: str | None, last_line: str) -> dict[str, Any]:
    """The load average (the machine is shared: figures hold only side by side), the JSON file if asked, and the
    bench's last line."""
    print(f"load average at the end (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if json_out:
        Path(json_out).write_text(json.dumps(out, indent=2))
    print(last_line)
    return out
