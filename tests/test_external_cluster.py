"""A real multi-machine shape on one machine: a Dask scheduler and two workers started as separate processes with
Dask's own command-line tools (what README "Running on a cluster" tells a user to type on each machine), a run sent
to them with ``equi run --cluster ADDRESS``, and one worker SIGKILLed while it holds a shard.

The workers share nothing with the flow process but the files: the repository on PYTHONPATH, the data, the shipped
weights, and the results and cache folders at the same paths (on a cluster, a shared filesystem). The run must end
with exactly the per-image rows and the results table of an in-process run of the same config.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows import pipeline
from storage import results as R
from tasks.config import parse_config
from tasks.faults import hits
from tests.pipeline_helpers import REPO, kill_the_holder, table_rows, tiny_config, write_config

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]

BOOT_TIMEOUT_S = 90.0


def dask_cli() -> list[str]:
    """Dask's ``dask`` command of this environment (``python -m dask`` where the script is not installed)."""
    script = Path(sys.executable).with_name("dask")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dask"]


def sample_rows(results_dir: str | Path, run_id: str) -> list[tuple]:
    """Every per-image row of a run's shard files, all columns (NaN as None so equal rows compare equal)."""

    def plain(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        return tuple(plain(x) for x in v) if isinstance(v, list) else v

    out = []
    for path in R.list_shards(results_dir, run_id):
        unit = R.read_shard_unit(path)
        for row in R.read_shard(path)[0].to_pylist():
            out.append((unit["attack_key"], unit["defense_key"], *(plain(v) for v in row.values())))
    return sorted(out, key=repr)


class Processes:
    """Processes started by this test, each in its own session; all of them are stopped at the end."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env, self.procs = folder, env, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115  (closed with the process)
        proc = subprocess.Popen(
            [*dask_cli(), *args], cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.procs[name] = (proc, log)
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for proc, _log in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, log in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
            log.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, Processes]]:
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1; (scheduler address, the processes).

    The workers hold shard 1's defense step once (``EQUI_FAULTS=defend:1:1:hold``): the worker that reaches it
    writes its pid and waits to be killed."""
    folder = tmp_path / "cluster"
    folder.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "3",
        "EQUI_FAULTS": "defend:1:1:hold",
        "EQUI_FAULTS_DIR": str(tmp_path),
        "EQUI_FAULTS_HOLD_S": "120",
    }
    procs = Processes(folder, env)
    scheduler_file = folder / "scheduler.json"
    try:
        procs.start(
            "scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
            "--scheduler-file", str(scheduler_file),
        )  # fmt: skip
        for name in ("worker-a", "worker-b"):
            procs.start(
                name, "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "1", "--nthreads", "1",
                "--host", "127.0.0.1", "--no-dashboard", "--name", name, "--local-directory", str(folder / name),
            )  # fmt: skip
        address = wait_for_workers(scheduler_file, 2, procs)
        yield address, procs
    finally:
        procs.stop_all()


def wait_for_workers(scheduler_file: Path, n: int, procs: Processes) -> str:
    from distributed import Client

    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while not scheduler_file.exists():
        assert time.monotonic() < deadline, "the scheduler did not start: " + procs.log("scheduler")
        time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    assert address.startswith("tcp://127.0.0.1:"), address
    with Client(address, timeout=BOOT_TIMEOUT_S) as client:
        client.wait_for_workers(n, timeout=BOOT_TIMEOUT_S)
    return address


def test_equi_run_on_a_dask_cli_cluster_survives_a_worker_sigkill(tmp_path: Path, cluster) -> None:
    address, procs = cluster
    small = {"shard_size": 10, "batch_size": 10}  # 2 shards: 2 attack and 8 defense tasks
    cfg = tiny_config(tmp_path, cluster={"torch_threads": 1}, **small)
    killer, killed = kill_the_holder(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(write_config(tmp_path, cfg)), "--cluster", address, "-q"],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("EQUI_FAULTS")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    killer.join(timeout=5)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert killed, "no worker reached the fault point: " + procs.log("worker-a") + procs.log("worker-b")
    pids = hits("defend", 1, directory=tmp_path)
    assert pids[0] == killed[0] and killed[0] not in pids[1:], "the held shard was not rerun by another process"
    assert "Traceback" not in out.stderr, out.stderr
    run_id = parse_config(cfg).run_id()
    assert len(R.list_shards(cfg["results_dir"], run_id)) == 8

    # The same config, in this process, with no Dask: the reference.
    ref = tiny_config(tmp_path / "reference", cluster={"in_process": True, "torch_threads": 1}, **small)
    ref_cfg = parse_config(ref)
    assert pipeline.run(ref_cfg).ok
    assert sample_rows(cfg["results_dir"], run_id) == sample_rows(ref_cfg.results_dir, ref_cfg.run_id())
    assert table_rows(cfg["results_dir"], run_id) == table_rows(ref_cfg.results_dir, ref_cfg.run_id())
