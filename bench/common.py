"""Pieces the pipeline benches share: the long-lived Prefect server a nightly setup keeps, and how a bench ends."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def long_lived_server(results_dir: Path, workers: int = 0, cwd: Path | None = None) -> Iterator[Any]:
    """An ``equi server`` for ``results_dir`` for the block (started untimed, stopped after), with a warm Dask
    cluster of ``workers`` workers (0: none) working in ``cwd`` (the runs' working directory; default this one);
    refused when a Prefect API is configured, since every run would then use that one instead."""
    from flows.cluster_setup import machine_workers
    from flows.prefect_api import configured_api_url
    from flows.prefect_server import start_server, stop_server

    if configured_api_url():
        raise SystemExit("a Prefect API is configured (PREFECT_API_URL or the active profile): unset it")
    warm = f" with {workers} warm worker(s)" if workers else ""
    print(f"starting a long-lived Prefect server{warm} for {results_dir} (not timed) ...", flush=True)
    gpus = machine_workers(workers)[1] if workers else 0
    with contextlib.chdir(cwd or Path.cwd()):
        server, _ = start_server(results_dir, workers=workers, gpus=gpus)
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
