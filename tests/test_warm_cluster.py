"""The warm Dask cluster of ``equi server start --workers N`` (issue #18): runs of its results directory submit to it
instead of starting a cluster, leave it running, and get the tables of an in-process run; ``equi server stop``
stops it; a run whose recorded cluster is dead starts its own, saying so in one line; a run that chose its own
cluster settings, or whose workers would compute differently, does not use it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from typer.testing import CliRunner

from flows import pipeline, startup
from flows import prefect_api as A
from flows import prefect_server as S
from flows import warm_cluster as W
from flows.cli import app
from flows.scheduler_check import check_scheduler
from storage.run_store import RunStore
from tasks.config import ConfigError, parse_config
from tests.pipeline_helpers import table_rows, tiny_config

TWO_UNITS = {"attacks": [{"name": "clean"}], "defenses": [{"name": "vanilla"}]}  # 10 digits in 2 shards


def _config(tmp: Path, name: str, results: Path, **cluster: Any) -> dict:
    cfg = tiny_config(tmp, name=name, cluster={"torch_threads": 1, **cluster}, **TWO_UNITS)
    cfg["dataset"]["limit"] = 10
    cfg["results_dir"] = str(results)
    return cfg


def _stop(results: Path, server: S.ServerInfo) -> S.ServerInfo | None:
    """``equi server stop``, once the logs the runs of this process queued for the server are sent."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        APILogHandler().flush()
    return S.stop_server(results)


@pytest.fixture
def warm_server(tmp_path: Path, no_configured_api: None) -> Iterator[S.ServerInfo]:
    """`equi server start --workers 1` for tmp_path/results; stopped at the end, also when the test fails."""
    results = tmp_path / "results"
    server, started = S.start_server(results, workers=1)
    try:
        assert started and server.cluster is not None
        yield server
    finally:
        _stop(results, server)


def _gone(pid: int, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while S.process_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not S.process_exists(pid)


@pytest.mark.slow  # a real Prefect server with a warm worker, two runs through it
def test_runs_use_the_warm_cluster_leave_it_running_and_equi_server_stop_stops_it(
    tmp_path: Path, warm_server: S.ServerInfo, phases: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = warm_server.cluster
    assert cluster is not None and cluster.address.startswith("tcp://127.0.0.1:") and cluster.workers == 1
    results = tmp_path / "results"

    def no_new_cluster(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a run started a LocalCluster although the warm one answers")

    cfgs = [parse_config(_config(tmp_path, name, results)) for name in ("warm-a", "warm-b")]
    with monkeypatch.context() as spy:
        spy.setattr("distributed.deploy.local.LocalCluster.__init__", no_new_cluster)
        summaries = list(
            pipeline.run_many(cfgs)
        )  # `equi experiments`: no shared cluster either, each run on the warm one
    for cfg, summary in zip(cfgs, summaries, strict=True):
        assert summary.ok and summary.computed == 2
        manifest = RunStore(results, cfg.run_id()).read_manifest()
        assert manifest["config"]["cluster"]["address"] == cluster.address  # submitted to the warm scheduler
    assert sum(p.startswith("using the warm Dask cluster of `equi server`: 1 worker(s)") for p in phases) == 2, phases
    assert not any("starting a local Dask cluster" in p for p in phases), phases
    # Still running, the same scheduler, its worker still there.
    identity = check_scheduler(cluster.address, 5)
    assert identity["id"] == cluster.scheduler_id and identity["n_workers"] == 1 and S.cluster_alive(cluster)
    tree = [psutil.Process(cluster.pid), *psutil.Process(cluster.pid).children(recursive=True)]
    listening = {c.laddr.ip for p in tree for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}  # scheduler, nanny, worker and their HTTP endpoints: loopback only
    status = CliRunner().invoke(app, ["server", "status", "-r", str(results)])
    assert status.exit_code == 0, status.output
    assert (
        f"warm Dask cluster for the runs of {results}: {cluster.address}, 1 worker(s) started, 1 worker(s) connected"
        in (" ".join(status.output.split()))
    )
    reference = parse_config(_config(tmp_path, "warm-a", tmp_path / "ref", in_process=True))
    assert pipeline.run(reference).ok
    expected = table_rows(reference.results_dir, reference.run_id())
    assert all(table_rows(results, cfg.run_id()) == expected for cfg in cfgs)
    stopped = _stop(results, warm_server)
    assert stopped is not None and stopped.cluster == cluster
    assert _gone(cluster.pid) and S.read_state(results) is None
    with pytest.raises(ConfigError):
        check_scheduler(cluster.address, 1)


@pytest.mark.slow  # a real Prefect server whose warm cluster dies, and a run on a local cluster of its own
def test_a_run_whose_warm_cluster_died_starts_its_own_and_says_so(
    tmp_path: Path, warm_server: S.ServerInfo, phases: list[str]
) -> None:
    cluster = warm_server.cluster
    assert cluster is not None
    os.killpg(cluster.pid, signal.SIGKILL)  # the cluster's process and its workers (its session)
    assert _gone(cluster.pid)
    results = tmp_path / "results"
    cfg = parse_config(_config(tmp_path, "fallback", results))
    summary = pipeline.run(cfg)
    assert summary.ok and summary.computed == 2
    gone = f"the warm Dask cluster of `equi server` at {cluster.address} is gone"
    assert any(p.startswith(gone) and p.endswith("this run starts a local cluster of its own") for p in phases), phases
    assert any(p.startswith("starting a local Dask cluster") for p in phases), phases
    assert RunStore(results, cfg.run_id()).read_manifest()["config"]["cluster"]["address"] is None
    reference = parse_config(_config(tmp_path, "fallback", tmp_path / "ref", in_process=True))
    assert pipeline.run(reference).ok
    assert table_rows(results, cfg.run_id()) == table_rows(reference.results_dir, reference.run_id())


@pytest.mark.slow  # a real warm cluster (one worker) beside a stand-in for the server's process
def test_the_warm_cluster_ends_with_the_servers_process(tmp_path: Path) -> None:
    server = subprocess.Popen(["sleep", "600"])
    ready = tmp_path / S.CLUSTER_READY
    cmd = [sys.executable, "-m", S.CLUSTER_MODULE, "--server-pid", str(server.pid), "--workers", "1"]
    cluster = subprocess.Popen([*cmd, "--ready", str(ready)], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and cluster.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        info = S.ClusterInfo(**json.loads(ready.read_text()))
        assert info.pid == cluster.pid and check_scheduler(info.address, 5)["n_workers"] == 1
        assert info.context == W.worker_context()  # what a run started here compares against
        server.kill()
        server.wait()
        assert cluster.wait(timeout=30) == 0
        with pytest.raises(ConfigError):
            check_scheduler(info.address, 1)
    finally:
        server.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cluster.pid, signal.SIGKILL)


def test_server_start_refuses_a_negative_worker_count_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["server", "start", "-r", str(tmp_path / "results"), "--workers", "-1"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--workers: expected 0 (no warm cluster) to" in lines[0]
    assert S.read_state(tmp_path / "results") is None


# ---------------------------------------------------------------------------------------------- when it is not used
def _recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **over: Any) -> S.ClusterInfo:
    """A server state that records a warm cluster (nothing is started): the API choice says `equi server`."""
    fields: dict[str, Any] = {
        "address": f"tcp://127.0.0.1:{S.free_port()}",  # nothing listens there
        "pid": os.getpid(),
        "scheduler_id": "Scheduler-x",
        "workers": 2,
        "gpus": 0,
        "torch_threads": 1,
        "log": "cluster.log",
        "context": W.worker_context(),
    }
    cluster = S.ClusterInfo(**{**fields, **over})
    server = S.ServerInfo(1, "h", 9, "http://127.0.0.1:9/api", "home", "server.log", "t", "equi server start", cluster)
    monkeypatch.setattr(W, "running_server", lambda results_dir: server)
    monkeypatch.setattr(W, "cluster_alive", lambda info: True)
    monkeypatch.setattr(startup, "choose_api", lambda results_dir: A.ApiChoice(A.EQUI_SERVER, server.api_url))
    return cluster


def test_a_recorded_scheduler_that_does_not_answer_leaves_the_run_on_its_own_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phases: list[str], no_configured_api: None
) -> None:
    cluster = _recorded(tmp_path, monkeypatch)
    cfg = parse_config(_config(tmp_path, "dead", tmp_path / "results", connect_timeout_s=1))
    started = time.monotonic()
    with startup.Launch(cfg) as launch:
        assert launch.warm is None and launch.cfg is cfg  # today's path: a local cluster of its own
        launch.announce()
    assert time.monotonic() - started < 10
    note = f"the warm Dask cluster of `equi server` at {cluster.address}: no Dask scheduler answered within 1 s"
    assert any(p.startswith(note) and p.endswith("a local cluster of its own") for p in phases), phases


def test_the_warm_cluster_is_used_only_when_the_run_chose_nothing_and_its_workers_would_compute_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_configured_api: None
) -> None:
    cluster = _recorded(tmp_path, monkeypatch)
    monkeypatch.setattr(W, "check_scheduler", lambda *a: {"id": cluster.scheduler_id, "n_workers": 2})
    results = tmp_path / "results"
    cfg = parse_config(_config(tmp_path, "auto", results))
    with startup.Launch(cfg) as launch:
        assert launch.warm == cluster
        assert launch.cfg.cluster.address == cluster.address and launch.cfg.run_id() == cfg.run_id()
    for chosen in ({"n_workers": 2}, {"in_process": True}, {"threads_per_worker": 2}):
        with startup.Launch(parse_config(_config(tmp_path, "chosen", results, **chosen))) as launch:
            assert launch.warm is None and launch.warm_note is None and launch.cfg.cluster.address is None
    # Workers that would compute differently: another data root, or code edited since the cluster started.
    monkeypatch.setenv("EQUI_DATA_DIR", str(tmp_path / "elsewhere"))
    assert "EQUI_DATA_DIR differ" in (W.warm_cluster(cfg)[1] or "")
    monkeypatch.delenv("EQUI_DATA_DIR")
    _recorded(tmp_path, monkeypatch, context={**cluster.context, "code": "edited"})
    assert "the code changed since it started" in (W.warm_cluster(cfg)[1] or "")
    # Loopback only, whatever the state file says.
    _recorded(tmp_path, monkeypatch, address="tcp://10.1.2.3:8786")
    assert "not on a loopback interface" in (W.warm_cluster(cfg)[1] or "")
