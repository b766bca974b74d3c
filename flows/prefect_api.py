"""The Prefect API a run's flow and Dask workers report to, chosen in this order:

1. ``PREFECT_API_URL`` (environment or active profile): a server the user runs, used as it is;
2. the server ``equi server start -r RESULTS_DIR`` keeps for the run's results directory
   (:mod:`flows.prefect_server`), when its state file names a live process that answers ``/health``: no API to
   start, and the runs stay in its UI. A state file whose server does not answer is named in one line and a
   temporary API is used instead;
3. Prefect's temporary API (a uvicorn subprocess on 127.0.0.1, gone when the run ends). It is *launched* as soon as
   the run knows it needs one and *waited for* only when the flow starts, so its start-up (10-40 s on a loaded
   2-core machine) overlaps loading the model, planning and starting the Dask cluster.

One API serves the flow and every worker: without it each worker process would start its own temporary API on the
same SQLite file.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flows.prefect_server import STARTUP_TIMEOUT_S, ServerError, api_error, free_port, running_server

CONFIGURED = "PREFECT_API_URL"
EQUI_SERVER = "equi server"
TEMPORARY = "temporary"


def configured_api_url() -> str | None:
    """The Prefect server the user points at (environment or active profile), or None for a temporary API."""
    from prefect.settings import get_current_settings

    return os.environ.get("PREFECT_API_URL") or get_current_settings().api.url or None


@dataclass(frozen=True)
class ApiChoice:
    source: str  # CONFIGURED | EQUI_SERVER | TEMPORARY
    url: str | None  # None for a temporary API: its port is picked when it is launched
    note: str | None = None  # why the results directory's `equi server` is not used (it does not answer)

    @property
    def keeps_runs(self) -> bool:
        """A server someone reads (its UI, its history), as opposed to a temporary API nobody sees."""
        return self.source != TEMPORARY


def equi_server_api(results_dir: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """(API URL of the `equi server` of ``results_dir`` when it runs and answers, why it is not used otherwise)."""
    try:
        info = running_server(results_dir)
    except ServerError as e:  # an unreadable state file: say so, and run on a temporary API
        return None, str(e)
    if info is None:
        return None, None
    if why := api_error(info.api_url, timeout_s=5.0):
        return None, (
            f"the Prefect server of {results_dir} (pid {info.pid}, {info.api_url}) does not answer ({why}; log "
            f"{info.log})"
        )
    return info.api_url, None


def choose_api(results_dir: str | os.PathLike[str] | None) -> ApiChoice:
    """Which API a run uses (module docstring); nothing is started here."""
    if url := configured_api_url():
        return ApiChoice(CONFIGURED, url)
    url, why = equi_server_api(results_dir) if results_dir is not None else (None, None)
    if url:
        return ApiChoice(EQUI_SERVER, url)
    return ApiChoice(TEMPORARY, None, why)


def temporary_api_command(port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment of Prefect's temporary API server on 127.0.0.1:``port``: what Prefect's
    ``SubprocessASGIServer`` runs (tests/test_startup.py compares them), without importing ``prefect.server`` here
    (3 s of this process's start-up, for a module only the server process needs)."""
    import prefect
    from prefect.settings import get_current_settings

    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory"]
    args += ["prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--log-level", "error", "--lifespan", "on"]
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",  # a temporary API serves no UI
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }
    return args, env


class TemporaryApi:
    """Prefect's temporary API server in two steps: :meth:`launch` starts its process and returns at once,
    :meth:`wait` returns once it answers ``/health``. (Prefect's own ``SubprocessASGIServer.start()`` does both in
    one blocking call.)"""

    def __init__(self) -> None:
        self.port = free_port()  # an OS-assigned free port: the URL is known before the server listens
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen[bytes] | None = None
        self._ready = False

    def launch(self) -> None:
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry attempts
        args, env = temporary_api_command(self.port)
        self.process = subprocess.Popen(args, env=env)  # noqa: S603  (our interpreter, fixed arguments)
        atexit.register(self.stop)  # as Prefect does: never outlive this process

    def wait(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Return once the API answers; ServerError (one line) when its process ends or it does not answer in time
        (EQUI_PREFECT_STARTUP_TIMEOUT_S, default 180 s: a loaded machine is slow)."""
        if self._ready:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerError(
                    f"the temporary Prefect API at {self.url} exited during start-up (exit code {code}); keep a "
                    "server with `equi server start -r RESULTS_DIR`, or try again"
                )
            if api_error(self.url, timeout_s=2.0) is None:
                self._ready = True
                return
            time.sleep(0.1)
        raise ServerError(
            f"the temporary Prefect API did not answer at {self.url} within {timeout_s:g} s (raise "
            "EQUI_PREFECT_STARTUP_TIMEOUT_S on a slow machine, or keep a server: `equi server start`)"
        )

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RunApi:
    """The API a run uses once chosen: its URL (set in the environment that local Dask workers inherit) and
    :meth:`ready`, which waits for a temporary API and points this process's Prefect settings at it."""

    def __init__(self, choice: ApiChoice, temporary: TemporaryApi | None = None) -> None:
        self.choice = choice
        self.temporary = temporary
        self.url: str = temporary.url if temporary is not None else (choice.url or "")

    @property
    def source(self) -> str:
        return self.choice.source

    def describe(self) -> str:
        """The progress line that says which API the run uses."""
        if self.source == CONFIGURED:
            return f"using the Prefect server at {self.url} (PREFECT_API_URL; UI: {self.url.removesuffix('/api')})"
        if self.source == EQUI_SERVER:
            return (
                f"using the Prefect server `equi server` runs for this results directory at {self.url} "
                f"(UI: {self.url.removesuffix('/api')})"
            )
        return (
            f"using a temporary Prefect API at {self.url}, started in the background (`equi server start -r "
            "RESULTS_DIR` keeps a server, with its UI, and saves this start-up)"
        )

    @contextlib.contextmanager
    def ready(self) -> Iterator[None]:
        """This process's Prefect settings point at the API, which answers (a temporary one is waited for here)."""
        if self.source == CONFIGURED:  # the user's settings already say it
            yield
            return
        if self.temporary is not None:
            self.temporary.wait()
        from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

        updates: dict[Any, Any] = {PREFECT_API_URL: self.url}
        if self.temporary is not None:
            updates[PREFECT_LOGGING_TO_API_ENABLED] = False
        # This process's settings were read at import; the environment (set by open_api) reaches the workers.
        with temporary_settings(updates=updates):
            yield


@contextlib.contextmanager
def open_api(choice: ApiChoice) -> Iterator[RunApi]:
    """Start using the chosen API: a temporary one is launched (not waited for) and the environment the Dask
    workers inherit points at it. On exit the environment is restored and a temporary API stopped."""
    if choice.source == CONFIGURED:
        yield RunApi(choice)
        return
    temporary = TemporaryApi() if choice.source == TEMPORARY else None
    env = {"PREFECT_API_URL": temporary.url if temporary is not None else choice.url or ""}
    if temporary is not None:
        # Nobody reads a temporary API's logs, and log shipping after it stops only prints connection errors.
        env["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
        temporary.launch()  # before the environment changes: the server serves an API, it does not use one
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield RunApi(choice, temporary)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if temporary is not None:
            temporary.stop()


@contextlib.contextmanager
def prefect_api(results_dir: str | os.PathLike[str] | None = None) -> Iterator[RunApi]:
    """One Prefect API, answering, for everything run inside (``equi demo``, ``equi tune``, tests): the module's
    order of choice; a temporary API lives as long as the block."""
    with open_api(choose_api(results_dir)) as api, api.ready():
        yield api
