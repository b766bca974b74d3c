"""``equi deploy`` on a real local Prefect server, and the next morning's ``equi status | resume | report``.

One server per module (``flows.prefect_server.start_server``, what ``equi server start`` runs: 127.0.0.1, a free
port, PREFECT_HOME under the results directory) and one ``equi deploy`` process that finds it through the server's
state file. Each test creates a flow run from the deployment, which is what the server's scheduler does when the
cron fires, and the served process runs it. The deploy process carries ``EQUI_FAULTS=defend:1:always``: the good
config has one shard (shard 0) and completes; the same deployment run on the bad config (two shards, a parameter
override as in the UI's "custom run") loses shard 1 and must end Failed, not Completed.

Every process started here is stopped by the fixtures' finalizers, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows import prefect_server as S
from flows.cli import app
from tests.pipeline_helpers import REPO, mnist_root, tiny_config, write_config

CRON = "0 3 * * *"
DEPLOYMENT = "equirobust-scheduled/nightly"
RUN_TIMEOUT_S = 150  # a flow run's subprocess imports torch and Prefect: slow on a loaded 2-core machine


def _config(tmp: Path, name: str, limit: int) -> dict:
    cfg = tiny_config(tmp, name=name, cluster={"in_process": True, "torch_threads": 1}, defenses=[{"name": "vanilla"}])
    cfg["dataset"]["limit"] = limit  # shard_size 5: limit 5 is shard 0 only, limit 10 adds shard 1
    return cfg


@dataclass
class Nightly:
    tmp: Path
    results: Path
    good: Path
    bad: Path
    server: S.ServerInfo
    deploy: subprocess.Popen
    out: Path
    err: Path

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()


def _stop_process_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
            return


@contextlib.contextmanager
def _client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def _deployment(api_url: str, deadline_s: float, deploy: subprocess.Popen, output) -> object:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + deadline_s
    with _client(api_url) as client:
        while time.monotonic() < deadline:
            assert deploy.poll() is None, f"equi deploy exited ({deploy.returncode}):\n{output()}"
            with contextlib.suppress(ObjectNotFound):
                return client.read_deployment_by_name(DEPLOYMENT)
            time.sleep(0.5)
    raise AssertionError(f"the deployment was not registered within {deadline_s} s:\n{output()}")


@pytest.fixture(scope="module")
def nightly(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nightly]:
    tmp = tmp_path_factory.mktemp("nightly")
    mnist_root(tmp)
    good = write_config(tmp, _config(tmp, "nightly-good", 5), "good.yaml")
    bad = write_config(tmp, _config(tmp, "nightly-bad", 10), "bad.yaml")
    results = tmp / "results"
    server, started = S.start_server(results)
    assert started and server.api_url.startswith("http://127.0.0.1:")
    out, err = tmp / "deploy.out", tmp / "deploy.err"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "EQUI_FAULTS"))}
    env.update(
        PYTHONPATH=str(REPO),
        PREFECT_HOME=str(tmp / "client-home"),  # never the user's profiles; no PREFECT_API_URL: found via state file
        PREFECT_RUNNER_POLL_FREQUENCY="1",  # the runner asks for due runs every second, not every 10
        EQUI_FAULTS="defend:1:always",
        EQUI_FAULTS_DIR=str(tmp),
        EQUIROBUST_TEST_THREADS="1",
    )
    cmd = [sys.executable, "-m", "flows.cli", "deploy", str(good), "--cron", CRON, "--name", "nightly"]
    cmd += ["--timezone", "Europe/Berlin"]
    with open(out, "wb") as o, open(err, "wb") as e:
        deploy = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=o, stderr=e, start_new_session=True)
    try:
        yield Nightly(tmp, results, good, bad, server, deploy, out, err)
    finally:
        _stop_process_group(deploy)
        S.stop_server(results)


def _run_deployment(n: Nightly, parameters: dict | None = None):
    """Create a flow run of the deployment (what the scheduler does when the cron fires) and wait for its end."""
    dep = _deployment(n.server.api_url, 120, n.deploy, n.output)
    with _client(n.server.api_url) as client:
        run = client.create_flow_run_from_deployment(dep.id, parameters=parameters)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                return run, _flow_run_logs(client, run.id)
            assert n.deploy.poll() is None, f"equi deploy exited ({n.deploy.returncode}):\n{n.output()}"
            time.sleep(0.5)
    raise AssertionError(f"flow run {run.id} did not finish within {RUN_TIMEOUT_S} s:\n{n.output()}")


def _flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


def _flow_run_logs(client, flow_run_id, wait_s: float = 30) -> list[str]:
    """The run's log lines on the server, once its last line arrived (logs are shipped in batches, after the state)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + wait_s
    while True:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        messages = [log.message for log in logs]
        if any(m.startswith("Finished in state") for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


@pytest.mark.slow  # a real Prefect server and an `equi deploy` process
def test_the_deployment_is_registered_with_its_cron(nightly: Nightly) -> None:
    dep = _deployment(nightly.server.api_url, 120, nightly.deploy, nightly.output)
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == [(CRON, "Europe/Berlin", True)]
    assert dep.parameters == {"config_path": str(nightly.good.resolve())}
    assert not dep.paused
    out = nightly.out.read_text()
    assert f"serving deployment '{DEPLOYMENT}' on {nightly.server.api_url}" in out
    assert "next run" in out and "Your flow" not in out  # our line, not Prefect's banner


def _listening(port: int) -> list[str]:
    """The local addresses with a socket listening on ``port`` (Linux's /proc/net/tcp and tcp6)."""
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / table
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
                found.append(socket.inet_ntop(family, raw))
    return found


@pytest.mark.slow  # a real Prefect server and an `equi deploy` process
def test_the_server_listens_on_loopback_only(nightly: Nightly) -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux's /proc/net/tcp")
    assert _listening(nightly.server.port) == ["127.0.0.1"]


@pytest.mark.slow  # a real Prefect server and an `equi deploy` process
def test_a_good_night_completes_and_logs_its_start_and_end(nightly: Nightly) -> None:
    from tasks.config import load_config

    run, logs = _run_deployment(nightly)
    assert run.state.is_completed(), (run.state, nightly.output())
    run_id = load_config(nightly.good).run_id()
    assert f"starting: config {nightly.good.resolve()}" in logs
    assert any(m.startswith(f"finished: run {run_id}: 2 computed, 0 done before, 0 failed") for m in logs), logs
    assert not any(m.startswith("failed shard") for m in logs)
    assert f"finished: run {run_id}" in nightly.err.read_text()  # the served process shows it too


@pytest.mark.slow  # a real Prefect server and an `equi deploy` process
def test_a_night_with_a_failed_shard_ends_failed_and_the_next_morning_repairs_it(
    nightly: Nightly, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.config import load_config

    run, logs = _run_deployment(nightly, {"config_path": str(nightly.bad.resolve())})
    run_id = load_config(nightly.bad).run_id()
    assert run.state.is_failed(), (run.state, nightly.output())
    assert f"run {run_id}: 2 shard(s) failed" in (run.state.message or "")
    failed = sorted(m for m in logs if m.startswith("failed shard: "))
    error = "InjectedFault: injected fault in defend shard 1 (always)"
    assert failed == [
        f"failed shard: attack clean / defense vanilla shard 1: {error}",
        f"failed shard: attack pgd / defense vanilla shard 1: {error}",
    ], logs
    assert any(m.startswith(f"finished: run {run_id}: 2 computed, 0 done before, 2 failed") for m in logs)
    assert "Traceback" not in nightly.err.read_text()

    # The next morning: which run failed and why, resume it (the fault is gone), read the report.
    monkeypatch.delenv("EQUI_FAULTS", raising=False)
    cli, r = CliRunner(), ["-r", str(nightly.results)]
    listing = cli.invoke(app, ["status", *r, "--json"])
    assert listing.exit_code == 0, listing.output
    row = next(row for row in json.loads(listing.output) if row["run_id"] == run_id)
    assert (row["status"], row["failed"], row["done"]) == ("failed", 2, 2)
    status = cli.invoke(app, ["status", run_id, *r])
    assert status.exit_code == 0, status.output
    assert f"failed: fix the cause of the failed shards below, then `equi resume {run_id}`" in _flat(status.output)
    assert f"failed: pgd / vanilla shard 1 (attempts 1): attack pgd / defense vanilla: {error}" in _flat(status.output)
    resumed = cli.invoke(app, ["resume", run_id, *r, "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert "2 unit-shard(s) computed, 2 already done, 0 failed" in _flat(resumed.output)
    report = cli.invoke(app, ["report", run_id, *r])
    assert report.exit_code == 0, report.output
    assert f"## {run_id}" in report.output and "status complete" in report.output
    assert "| pgd |" in report.output
    after = cli.invoke(app, ["status", run_id, *r]).output
    assert f"{run_id} (complete," in after and "failed:" not in after


@pytest.mark.slow  # a real Prefect server and an `equi deploy` process
def test_ctrl_c_stops_serving_cleanly_and_leaves_the_server_running(nightly: Nightly) -> None:
    _deployment(nightly.server.api_url, 120, nightly.deploy, nightly.output)
    os.killpg(nightly.deploy.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends
    code = nightly.deploy.wait(60)
    assert code in (0, 130), nightly.output()
    assert "Traceback" not in nightly.output()
    assert f"stopped serving '{DEPLOYMENT}'" in nightly.out.read_text()
    with _client(nightly.server.api_url) as client:
        assert client.read_deployment_by_name(DEPLOYMENT).paused  # no Late runs pile up while nobody serves
    # A server `equi server start` started outlives deploy; `equi server stop` stops it.
    cli, r = CliRunner(), ["-r", str(nightly.results)]
    status = cli.invoke(app, ["server", "status", *r])
    assert status.exit_code == 0 and f"{nightly.server.api_url}, answering" in status.output, status.output
    stop = cli.invoke(app, ["server", "stop", *r])
    assert stop.exit_code == 0 and f"pid {nightly.server.pid}" in stop.output, stop.output
    assert S.api_error(nightly.server.api_url, timeout_s=2) is not None
    assert cli.invoke(app, ["server", "status", *r]).exit_code == 1


# ------------------------------------------------------------------------------------------------ no server
def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_deploy_without_a_server_refuses_and_names_the_two_commands(tmp_path: Path, monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    mnist_root(tmp_path)
    cfg = write_config(tmp_path, _config(tmp_path, "nightly-good", 5), "good.yaml")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        line = _one_error_line(CliRunner().invoke(app, ["deploy", str(cfg), "--cron", "0 4 * * *"]))
    results = tmp_path / "results"
    assert f"run `equi server start -r {results}`, then `equi deploy {cfg} --cron '0 4 * * *'`" in line
    assert not (results / "prefect").exists()  # nothing started


def test_deploy_bad_input_is_one_line_exit_2(tmp_path: Path, monkeypatch) -> None:
    mnist_root(tmp_path)
    cfg = write_config(tmp_path, _config(tmp_path, "nightly-good", 5), "good.yaml")
    broken = write_config(tmp_path, {**_config(tmp_path, "x", 5), "shard_size": 0}, "broken.yaml")
    cli = CliRunner()
    assert "--cron: '61 2 * * *' is not a valid cron" in _one_error_line(
        cli.invoke(app, ["deploy", str(cfg), "--cron", "61 2 * * *"])
    )
    assert "--timezone: 'Mars/Olympus' is not an IANA time zone" in _one_error_line(
        cli.invoke(app, ["deploy", str(cfg), "--timezone", "Mars/Olympus"])
    )
    assert "shard_size" in _one_error_line(cli.invoke(app, ["deploy", str(broken)]))
    assert "--port needs --start-server" in _one_error_line(cli.invoke(app, ["deploy", str(cfg), "--port", "4300"]))
    port = S.free_port()  # nothing listens there
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    line = _one_error_line(cli.invoke(app, ["deploy", str(cfg)]))
    assert f"PREFECT_API_URL=http://127.0.0.1:{port}/api does not answer" in line


def test_server_start_on_a_port_in_use_is_one_line_exit_2(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["server", "start", "-r", str(tmp_path / "results"), "--port", str(port)])
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in _one_error_line(result)
    assert S.read_state(tmp_path / "results") is None


def test_a_state_file_whose_server_is_gone_is_not_used(tmp_path: Path) -> None:
    results = tmp_path / "results"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    S.server_dir(results).mkdir(parents=True)
    info = S.ServerInfo(dead.pid, socket.gethostname(), 1, "http://127.0.0.1:1/api", "h", "l", "t", "equi deploy")
    from storage.atomic import atomic_write_json

    atomic_write_json(S.server_dir(results) / S.STATE_FILE, info.__dict__)
    assert S.running_server(results) is None
    status = CliRunner().invoke(app, ["server", "status", "-r", str(results)])
    assert status.exit_code == 1 and f"pid {dead.pid}" in status.output and "which is gone" in status.output


@pytest.mark.slow  # a real Prefect server, started and stopped by `equi deploy --start-server`
def test_deploy_start_server_starts_its_own_server_and_stops_it_with_itself(tmp_path: Path) -> None:
    mnist_root(tmp_path)
    cfg = write_config(tmp_path, _config(tmp_path, "nightly-own", 5), "own.yaml")
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "client-home"))
    out, err = tmp_path / "deploy.out", tmp_path / "deploy.err"
    cmd = [sys.executable, "-m", "flows.cli", "deploy", str(cfg), "--cron", "30 1 * * *", "--start-server"]
    with open(out, "wb") as o, open(err, "wb") as e:
        deploy = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=o, stderr=e, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "serving deployment" not in out.read_text() and time.monotonic() < deadline:
            assert deploy.poll() is None, out.read_text() + err.read_text()
            time.sleep(0.5)
        server = S.running_server(results)
        assert server is not None and server.started_by == "equi deploy", out.read_text()
        assert f"started a Prefect server at {server.api_url}" in _flat(out.read_text())
        from prefect.exceptions import ObjectNotFound

        dep = None
        with _client(server.api_url) as client:
            deadline = time.monotonic() + 60
            while dep is None and time.monotonic() < deadline:
                with contextlib.suppress(ObjectNotFound):
                    dep = client.read_deployment_by_name("equirobust-scheduled/nightly-own")
                time.sleep(0.5)
        assert dep is not None, out.read_text() + err.read_text()
        assert [s.schedule.cron for s in dep.schedules] == ["30 1 * * *"]
        os.killpg(deploy.pid, signal.SIGINT)
        assert deploy.wait(60) in (0, 130)
        text = _flat(out.read_text() + err.read_text())
        assert "Traceback" not in text and f"stopped the Prefect server this command started (pid {server.pid})" in text
        assert S.read_state(results) is None and S.api_error(server.api_url, timeout_s=2) is not None
    finally:
        _stop_process_group(deploy)
        S.stop_server(results)
