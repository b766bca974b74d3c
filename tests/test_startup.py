"""How a run starts (issue #18): the Prefect API it uses (a running ``equi server`` of its results directory is
found and used), the Dask workers' preload, the local cluster started ahead of the flow, and the rule that runs a
small run in process when its config leaves the choice open. Tables are the same whichever way a run goes."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest

from flows import pipeline
from flows import prefect_api as A
from flows import prefect_server as S
from flows.startup import EarlyCluster, Launch, chosen_by_user, run_cluster_kwargs, small_run_reason
from flows.worker_preload import PRELOADED, TrimAfterTask
from tasks.config import ClusterConfig, parse_config
from tests.pipeline_helpers import table_rows, tiny_config

ONE_UNIT = {"attacks": [{"name": "clean"}], "defenses": [{"name": "vanilla"}]}  # 5 digits, 1 shard: 1 unit


def _one_unit_config(tmp: Path, cluster: dict[str, Any], name: str = "startup") -> dict:
    cfg = tiny_config(tmp, name=name, cluster=cluster, **ONE_UNIT)
    cfg["dataset"]["limit"] = 5
    return cfg


# ---------------------------------------------------------------------------------------------- the small-run rule
def test_the_rule_applies_only_when_nothing_chose_where_the_run_executes() -> None:
    auto = ClusterConfig()
    assert not chosen_by_user(auto) and not chosen_by_user(ClusterConfig(torch_threads=1, connect_timeout_s=1))
    for chosen in ({"n_workers": 2}, {"in_process": True}, {"address": "tcp://10.1.2.3:8786"}, {"dashboard": True}):
        assert chosen_by_user(ClusterConfig(**chosen)), chosen
    # An explicit cluster is never overridden, however small the run.
    assert small_run_reason(ClusterConfig(n_workers=1), 1, 1, keeps_runs=False) is None
    # A Prefect server that keeps runs is in use: the run goes to it, to be seen in its UI.
    assert small_run_reason(auto, 1, 1, keeps_runs=True) is None
    assert "one worker" in (small_run_reason(auto, 1, None, keeps_runs=False) or "")
    assert "1 unit-shard" in (small_run_reason(auto, 2, 1, keeps_runs=False) or "")
    assert small_run_reason(auto, 2, None, keeps_runs=False) is None  # not planned yet: the cluster may be needed
    assert small_run_reason(auto, 2, 2, keeps_runs=False) is None  # two units, two workers: run them at once


def test_a_one_unit_run_with_nothing_chosen_runs_in_process_with_the_same_table(
    tmp_path: Path, phases: list[str], no_configured_api: None
) -> None:
    auto = parse_config(_one_unit_config(tmp_path / "auto", {"torch_threads": 1}))
    summary = pipeline.run(auto)
    assert summary.ok and summary.computed == 1
    assert any(p.startswith("running in this process: ") for p in phases), phases
    assert not any("Prefect" in p or "starting a local Dask cluster" in p for p in phases), phases
    explicit = parse_config(_one_unit_config(tmp_path / "explicit", {"in_process": True, "torch_threads": 1}))
    assert pipeline.run(explicit).ok
    assert table_rows(auto.results_dir, auto.run_id()) == table_rows(explicit.results_dir, explicit.run_id())


# ---------------------------------------------------------------------------------------------- the Prefect API
def test_the_api_choice_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_configured_api: None) -> None:
    assert A.choose_api(tmp_path / "results") == A.ApiChoice(A.TEMPORARY, None)
    # A state file whose live server does not answer is named, and a temporary API is used.
    dead = S.ServerInfo(1, "h", 9, "http://127.0.0.1:9/api", "home", "server.log", "t", "equi server start")
    monkeypatch.setattr(A, "running_server", lambda results_dir: dead)
    choice = A.choose_api(tmp_path / "results")
    assert choice.source == A.TEMPORARY and choice.note and "does not answer" in choice.note
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert A.choose_api(tmp_path / "results") == A.ApiChoice(A.CONFIGURED, "http://127.0.0.1:9/api")


def test_the_temporary_api_runs_what_prefects_own_temporary_server_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.server.api import server as prefect_server

    captured: dict[str, Any] = {}
    monkeypatch.setattr(prefect_server.subprocess, "Popen", lambda args, env: captured.update(args=args, env=env))
    port = S.free_port()
    prefect_server.SubprocessASGIServer(port=port)._run_uvicorn_command()
    args, env = A.temporary_api_command(port)
    assert args == captured["args"]
    assert {k: v for k, v in env.items() if k.startswith("PREFECT")} == {
        k: v for k, v in captured["env"].items() if k.startswith("PREFECT")
    }


def test_a_launch_starts_the_api_and_cluster_without_waiting_and_stops_what_no_flow_took(
    tmp_path: Path, no_configured_api: None
) -> None:
    cfg = parse_config(tiny_config(tmp_path, cluster={"n_workers": 2}))  # a new run, on a cluster
    with Launch(cfg) as launch:
        assert launch.cluster is None  # not before the run has passed its checks
        launch.start_cluster()
        early = launch.cluster
        assert early is not None and early.kwargs == run_cluster_kwargs(cfg)
        api = launch.api
        assert api is not None and api.source == A.TEMPORARY and api.temporary is not None
        assert S.api_error(api.url, timeout_s=0.5) is not None  # still starting: nobody waited for it
        with api.ready():
            assert S.api_error(api.url) is None
            assert os.environ["PREFECT_API_URL"] == api.url  # what local workers inherit
        process = api.temporary.process
    assert process is not None and process.poll() is not None
    assert "PREFECT_API_URL" not in os.environ
    assert early._future is not None and early._future.result().status.name == "closed"
    in_process = parse_config(tiny_config(tmp_path, cluster={"in_process": True}))
    with Launch(in_process) as launch:
        assert launch.api is None


# ---------------------------------------------------------------------------------------------- the Dask cluster
class _FakeCluster:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_the_early_cluster_is_handed_to_the_flow_once_and_closed_when_unused(monkeypatch) -> None:
    monkeypatch.setattr("flows.startup._start_local_cluster", lambda kwargs: _FakeCluster())
    monkeypatch.setattr("flows.dask_shutdown.quiet_cluster_workers", lambda cluster: None)
    early = EarlyCluster({"n_workers": 2})
    first = early.take(n_workers=2)
    assert isinstance(first, _FakeCluster) and early.take(n_workers=2) is not first  # a second flow: its own
    early.close_unused()
    assert not first.closed  # the flow's runner closes the cluster it took
    unused = EarlyCluster({"n_workers": 2})
    started = unused._future.result()
    unused.close_unused()
    assert started.closed
    # Prefect sends the runner along with each task: a copy travels without threads and hands over nothing.
    copy = pickle.loads(pickle.dumps(EarlyCluster({"n_workers": 2}).take))
    assert isinstance(copy(n_workers=2), _FakeCluster)


@pytest.mark.slow  # a real LocalCluster whose worker imports torch and the engine
def test_a_worker_has_the_engine_imported_before_any_task(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    kwargs = run_cluster_kwargs(parse_config(tiny_config(tmp_path, cluster={"n_workers": 1})))
    assert kwargs["preload"] == ["flows.worker_preload"]

    def state(dask_worker: Any) -> tuple[list[str], bool, str | None]:  # client.run: not a task, nothing has run
        loaded = [m for m in PRELOADED if m in sys.modules]
        return loaded, TrimAfterTask.name in dask_worker.plugins, os.environ.get("MALLOC_TRIM_THRESHOLD_")

    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        (loaded, trims, threshold), *others = client.run(state).values()
    assert not others and loaded == list(PRELOADED)
    # Without Dask's MALLOC_TRIM_THRESHOLD_ (torch's CPU work ran 2x slower with it); freed memory goes back after
    # each task instead.
    assert trims and (threshold is None or "MALLOC_TRIM_THRESHOLD_" in os.environ)


@pytest.mark.slow  # a real Prefect server (`equi server start`) and a Dask run on it
def test_a_run_uses_the_running_equi_server_of_its_results_dir(
    tmp_path: Path, phases: list[str], no_configured_api: None
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    data = _one_unit_config(tmp_path, {"n_workers": 1, "torch_threads": 1})  # a cluster, explicitly
    cfg = parse_config(data)
    server, started = S.start_server(cfg.results_dir)
    try:
        assert started
        summary = pipeline.run(cfg)
        assert summary.ok and summary.computed == 1
        used = f"using the Prefect server `equi server` runs for this results directory at {server.api_url}"
        assert any(p.startswith(used) for p in phases), phases
        assert not any("temporary Prefect API" in p for p in phases), phases
        assert any("Dask cluster" in p for p in phases), phases
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
            APILogHandler().flush()  # the run's logs went to this server: send them before it stops
        assert [r.state.type.value for r in runs if r.state] == ["COMPLETED"], runs
    finally:
        S.stop_server(cfg.results_dir)
    reference = parse_config({**data, "results_dir": str(tmp_path / "ref"), "cluster": {"in_process": True}})
    assert pipeline.run(reference).ok
    assert table_rows(cfg.results_dir, cfg.run_id()) == table_rows(reference.results_dir, reference.run_id())
    assert os.environ.get("PREFECT_API_URL") is None  # the run restored the environment
