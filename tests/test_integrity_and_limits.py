"""Run state, weights integrity, query limits and a quiet cluster shutdown (the reliability/security review, round 2).

- a run whose process group was SIGKILLed is "interrupted" in ``equi status`` (with the resume command), not
  "running": the run's lock is tested without being taken over;
- a run's manifest records its model's weights file and digest, and ``equi status RUN`` shows them; a checkpoint
  is hashed once per process per file version;
- ``storage.query.query`` stops a statement at its time limit and reads at most ``max_rows + 1`` rows;
- a local cluster's workers drop the heartbeat failure a closing scheduler causes, and nothing else.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from equicore.models import checkpoint as C
from equicore.models.common import WEIGHTS_DIR
from flows import pipeline
from flows.cli import app
from flows.dask_shutdown import HEARTBEAT_FAILURE, WORKER_LOGGER, ShutdownNoiseFilter, quiet_shutdown_logs
from storage.errors import QueryLimitError
from storage.locks import run_lock
from storage.query import connect, query
from storage.run_store import RunStore
from tasks.config import parse_config
from tests.pipeline_helpers import REPO, tiny_config, write_config

runner = CliRunner()


def _small(tmp: Path, **over) -> dict:
    cfg = tiny_config(tmp, cluster={"in_process": True, "torch_threads": 1}, **over)
    cfg.update(attacks=cfg["attacks"][:1], defenses=cfg["defenses"][:1])
    return cfg


def _status(*args: str) -> str:
    result = runner.invoke(app, ["status", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


# ------------------------------------------------------------------------------------------------ run state
def test_a_run_whose_process_group_was_killed_is_interrupted_not_running(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, cluster={"in_process": True, "torch_threads": 1})
    results, run_id = cfg["results_dir"], parse_config(cfg).run_id()
    killed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(write_config(tmp_path, cfg)), "-q", "--no-report"],
        cwd=REPO,
        env={**os.environ, "EQUI_FAULTS": "defend:1:1:killgroup", "EQUI_FAULTS_DIR": str(tmp_path)},
        capture_output=True,
        timeout=300,
        start_new_session=True,  # the fault kills this process group, never pytest's
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    store = RunStore(results, run_id)
    assert store.read_manifest()["status"] == "running"  # what the killed process last wrote
    assert store.run_state() == "interrupted"
    one = _status(run_id, "-r", results)
    assert f"{run_id} (interrupted," in one and f"`equi resume {run_id}`" in one, one
    listing = _status("-r", results)
    assert "interrupted" in listing and "running" not in listing, listing

    with run_lock(results, run_id):  # a live holder: then it is running, with the holder named
        assert store.run_state() == "running"
        held = _status(run_id, "-r", results)
        assert f"{run_id} (running," in held and f"running: pid {os.getpid()} on " in held, held

    assert pipeline.run(parse_config(cfg)).ok  # resume
    assert store.run_state() == "complete" and "(complete," in _status(run_id, "-r", results)


def test_a_status_probe_never_makes_a_starting_run_think_it_is_locked(tmp_path: Path) -> None:
    """The probe holds a shared lock for an instant; a run taking its lock at that instant retries briefly."""
    import fcntl

    from storage.locks import lock_path, open_lock_file

    results = tmp_path / "results"
    fd = open_lock_file(lock_path(results, "r1"))
    fcntl.flock(fd, fcntl.LOCK_SH)  # a probe that is slow to let go

    def release_soon() -> None:
        time.sleep(0.1)
        os.close(fd)

    import threading

    threading.Thread(target=release_soon, daemon=True).start()
    with run_lock(results, "r1"):
        assert RunStore(str(results), "r1").lock_holder() is not None


# ------------------------------------------------------------------------------------------------ weights
def test_the_manifest_and_status_name_the_weights_file_and_digest(tmp_path: Path) -> None:
    ckpt = tmp_path / "mine.pt"
    torch.save(C.load_checkpoint(WEIGHTS_DIR / "mnist_lenet5_clntrained.pt"), ckpt)
    for tag, checkpoint, shipped in (("user", str(ckpt), False), ("shipped", None, True)):
        over = {"name": tag} | (
            {"model": {"name": "lenet5_mnist_clean", "checkpoint": checkpoint}} if checkpoint else {}
        )
        cfg = parse_config(_small(tmp_path / tag, **over))
        assert pipeline.run(cfg).ok
        weights = RunStore(cfg.results_dir, cfg.run_id()).read_manifest()["weights"]
        path = ckpt if checkpoint else WEIGHTS_DIR / "mnist_lenet5_clntrained.pt"
        digest = C.weights_digest(path)
        assert weights == {
            "model": "lenet5_mnist_clean",
            "checkpoint": str(path),
            "shipped": shipped,
            "weights_digest": digest,
        }
        shown = _status(cfg.run_id(), "-r", cfg.results_dir)
        assert f"weights digest sha256:{digest}" in shown and str(path) in shown.replace("\n", ""), shown


def test_a_checkpoint_is_hashed_once_per_process_per_file_version(tmp_path: Path, monkeypatch) -> None:
    for name in ("fashion_cnn.pt", "fashion_cnn.pt.card.json"):
        shutil.copy(WEIGHTS_DIR / name, tmp_path / name)
    calls: list[int] = []
    real = C.weights_digest
    monkeypatch.setattr(C, "weights_digest", lambda sd: calls.append(1) or real(sd))
    path = tmp_path / "fashion_cnn.pt"
    for _ in range(3):
        C.load_checkpoint(path)
    assert len(calls) == 1
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new version of the file: hashed again
    C.load_checkpoint(path)
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------------ query limits
@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = _small(tmp_path_factory.mktemp("q"))
    assert pipeline.run(parse_config(cfg)).ok
    return Path(cfg["results_dir"])


def test_max_rows_allows_exactly_max_rows_and_refuses_one_more(results_dir: Path) -> None:
    assert query(results_dir, "select * from range(50)", max_rows=50).num_rows == 50
    with pytest.raises(QueryLimitError, match="more than 49 rows"):
        query(results_dir, "select * from range(50)", max_rows=49)
    with pytest.raises(QueryLimitError, match="more than 1000 rows"):  # streamed: the join is never materialised
        query(results_dir, "select * from range(100000) a, range(100000) b", max_rows=1000, timeout_s=30)
    with pytest.raises(QueryLimitError, match="Out of Memory Error: .* --memory-limit \\(256MB\\)"):
        # a join DuckDB materialises: stopped at the memory limit, with nothing spilled to disk
        query(results_dir, "select * from range(1000000000) a, range(1000000000) b", memory_limit="256MB")
    assert query(results_dir, "select count(*) as n from samples", max_rows=1, as_dicts=True) == [{"n": 20}]


def test_a_query_past_its_time_limit_is_interrupted_and_the_connection_goes_on(results_dir: Path) -> None:
    con = connect(results_dir)
    try:
        started = time.monotonic()
        with pytest.raises(QueryLimitError, match="stopped after 0.5 s"):
            query(results_dir, "select count(*) from range(100000000000) a, range(100000) b", con=con, timeout_s=0.5)
        assert time.monotonic() - started < 5
        assert query(results_dir, "select 42 as x", con=con, as_dicts=True, timeout_s=0.5) == [{"x": 42}]
        time.sleep(0.7)  # the cancelled timer of the query above must not interrupt a later one
        assert query(results_dir, "select 43 as x", con=con, as_dicts=True) == [{"x": 43}]
    finally:
        con.close()


def test_equi_query_defaults_are_the_documented_ones() -> None:
    import inspect

    from flows import cli
    from storage import query as Q

    params = inspect.signature(cli.query).parameters
    assert params["timeout_s"].default == Q.DEFAULT_TIMEOUT_S == 60
    assert params["max_rows"].default == Q.DEFAULT_MAX_ROWS == 100_000
    assert params["memory_limit"].default == Q.DEFAULT_MEMORY_LIMIT == "2GB"


def test_equi_query_flags_lift_the_limits(results_dir: Path) -> None:
    args = ["query", "select * from range(200001)", "-r", str(results_dir), "-f", "csv"]
    assert runner.invoke(app, args).exit_code == 2
    ok = runner.invoke(app, [*args, "--max-rows", "0", "--timeout-s", "0"])
    assert ok.exit_code == 0 and len(ok.stdout.splitlines()) == 200002
    bad = runner.invoke(app, [*args, "--max-rows", "-1"])
    assert bad.exit_code == 2 and "--max-rows" in bad.output


# ------------------------------------------------------------------------------------------------ shutdown
def test_workers_drop_the_heartbeat_failure_of_a_closing_scheduler_and_nothing_else() -> None:
    logger = logging.getLogger(WORKER_LOGGER)
    seen: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        quiet_shutdown_logs()
        quiet_shutdown_logs()  # idempotent
        assert sum(isinstance(f, ShutdownNoiseFilter) for f in logger.filters) == 1
        try:
            raise OSError("Timed out trying to connect to tcp://127.0.0.1:1")
        except OSError:
            logger.exception(f"{HEARTBEAT_FAILURE}.")
            logger.exception("Unexpected exception during heartbeat. Closing worker.")
        logger.error("Compute Failed")
    finally:
        logger.removeHandler(handler)
        for f in [f for f in logger.filters if isinstance(f, ShutdownNoiseFilter)]:
            logger.removeFilter(f)
    assert seen == ["Unexpected exception during heartbeat. Closing worker.", "Compute Failed"]


class _FakeClient:
    def __init__(self) -> None:
        self.ran: list[object] = []

    def run(self, fn):  # noqa: ANN001
        self.ran.append(fn)
        return {}


@pytest.mark.parametrize("address", [None, "tcp://127.0.0.1:8786"])
def test_the_runner_quiets_the_workers_of_its_own_cluster_only(address: str | None) -> None:
    from flows.dask_shutdown import LocalDaskTaskRunner

    runner = LocalDaskTaskRunner(address=address) if address else LocalDaskTaskRunner(cluster_kwargs={})
    runner.__enter__()
    client = runner._client = _FakeClient()  # what submitting the first task would have created
    runner.__exit__(None, None, None)
    assert client.ran == ([] if address else [quiet_shutdown_logs])


@pytest.mark.pipeline
def test_a_shared_local_cluster_quiets_its_real_workers_before_closing() -> None:
    from distributed import Client, LocalCluster

    from flows.dask_shutdown import quiet_cluster_workers

    def filters() -> list[str]:
        return [type(f).__name__ for f in logging.getLogger(WORKER_LOGGER).filters]

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as c:
        quiet_cluster_workers(c)
        with Client(c) as client:
            assert list(client.run(filters).values()) == [["ShutdownNoiseFilter"]] * 2
