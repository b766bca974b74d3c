"""The two ways to execute a work plan, with the same outcome: in this process, in order (no Prefect, no Dask: the
reference the flow must match), or as Prefect tasks on a Dask cluster (local, or an existing scheduler).

Both take the planned units of :mod:`flows.planning` and return an :data:`~flows.planning.Outcome` per unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flows.planning import Outcome, WorkPlan
from storage.cache import AdversarialCache
from storage.errors import DiskFullError
from storage.run_store import RunStore
from tasks.config import ConfigError, RunConfig
from tasks.runtime import Runtime, torch_threads_for
from tasks.shard_steps import attack_shard, defend_shard

# A task on a worker that dies (SIGKILL, OOM, preemption) is rescheduled on another worker up to this many times
# before Dask gives up on it (KilledWorker); set explicitly so a user's Dask config of 0 cannot turn it off.
ALLOWED_WORKER_DEATHS = 3

OnDone = Callable[[str], None]  # called with a unit's kind ("attack" | "defend") as each unit finishes


def short_error(exc: BaseException) -> str:
    """The first line of an error, with its type: what a failure record and the summary show."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:500]


# ------------------------------------------------------------------------------------------------- in process
def execute_in_process(rt: Runtime, store: RunStore, plan: WorkPlan, on_done: OnDone | None = None) -> Outcome:
    """The same steps, sequentially in this process (no Prefect, no Dask): the reference the flow must match."""
    if rt.cfg.cluster.torch_threads:
        import torch

        torch.set_num_threads(rt.cfg.cluster.torch_threads)
    cache = AdversarialCache(rt.cfg.cache_dir)
    outcome: Outcome = {}
    for unit in plan.attack_units:
        try:
            attack_shard(rt, cache, unit)
            outcome[unit] = ("ok", "")
        except DiskFullError:
            raise  # every later shard would fail the same way: stop, keeping what is done
        except Exception as e:  # noqa: BLE001  (recorded as a failed shard; the run goes on)
            outcome[unit] = ("failed", short_error(e))
        if on_done:
            on_done(unit.kind)
    for unit in plan.defend_units:
        if outcome.get(unit.upstream, ("ok", ""))[0] == "failed":
            outcome[unit] = ("failed", "skipped: its attack shard failed")
        else:
            try:
                defend_shard(rt, cache, store, unit)
                outcome[unit] = ("ok", "")
            except DiskFullError:
                raise
            except Exception as e:  # noqa: BLE001
                outcome[unit] = ("failed", short_error(e))
        if on_done:
            on_done(unit.kind)
    return outcome


# ------------------------------------------------------------------------------------------------- Prefect + Dask
def configured_api_url() -> str | None:
    """The Prefect server the user points at (environment or active profile), or None for a temporary API."""
    from prefect.settings import get_current_settings

    return os.environ.get("PREFECT_API_URL") or get_current_settings().api.url


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """One temporary Prefect API for the flow and all Dask workers (unless the user points at a server).

    Without this, every worker process would start its own ephemeral server on the same SQLite file.
    """
    if configured_api_url():  # a server the user runs (with the UI)
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry attempts
    server = SubprocessASGIServer()
    # Prefect's default startup wait (20 s) is too short on a loaded machine; an overnight run must not fail on it.
    server.start(timeout=int(os.environ.get("EQUI_PREFECT_STARTUP_TIMEOUT_S", "180")))
    # Nobody reads a temporary API's logs, and log shipping after it stops only prints connection errors.
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_LOGGING_TO_API_ENABLED")}
    os.environ.update(PREFECT_API_URL=server.api_url, PREFECT_LOGGING_TO_API_ENABLED="false")
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    try:
        # The environment reaches worker processes; this process's settings were read at import.
        with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_LOGGING_TO_API_ENABLED: False}):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def default_workers(cfg: RunConfig) -> tuple[int, int]:
    """(workers, GPUs): one worker per GPU, else one per core (each single-threaded)."""
    import torch

    gpus = torch.cuda.device_count() if cfg.device in ("auto", "cuda") else 0
    n = cfg.cluster.n_workers or (gpus or (os.cpu_count() or 1))
    return n, gpus


@contextlib.contextmanager
def local_cluster(n_workers: int | None = None, host: str = "127.0.0.1") -> Iterator[tuple[str, int, bool]]:
    """A LocalCluster shared by several runs (``equi demo``): (scheduler address, torch threads per worker, GPUs?)."""
    import dask
    import torch
    from distributed import LocalCluster

    from flows.dask_shutdown import quiet_cluster_workers

    gpus = torch.cuda.device_count()
    n = n_workers or (gpus or (os.cpu_count() or 1))
    kwargs: dict[str, Any] = {
        "n_workers": n,
        "threads_per_worker": 1,
        "processes": True,
        "host": host,
        "dashboard_address": None,
    }
    if gpus:
        kwargs["resources"] = {"GPU": 1}
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_WORKER_DEATHS}),
        LocalCluster(**kwargs) as cluster,
    ):
        try:
            yield cluster.scheduler_address, torch_threads_for(n), bool(gpus)
        finally:
            quiet_cluster_workers(cluster)


def check_cluster(cfg: RunConfig) -> None:
    """Before anything is written, what would otherwise hang: a scheduler (``--cluster``) must answer within
    ``cluster.connect_timeout_s``, and GPU resources need a GPU on the local cluster."""
    if cfg.cluster.in_process:
        return
    if cfg.cluster.address is not None:
        check_scheduler(cfg.cluster.address, cfg.cluster.connect_timeout_s)
    elif cfg.cluster.gpu_resources and default_workers(cfg)[1] == 0:
        raise ConfigError(
            "cluster.gpu_resources: true asks every task for a GPU, but the local cluster has none (torch sees no "
            "GPU); the tasks would wait forever: remove gpu_resources"
        )


def check_scheduler(address: str, timeout_s: float) -> None:
    """Ask the scheduler at ``address`` who it is, all within ``timeout_s`` (distributed's own connect timeout does
    not cover its handshake: a port that accepts and never answers would hang it); ConfigError in one line."""
    with ThreadPoolExecutor(1) as pool:  # a loop of its own, whether or not the caller runs one
        try:
            info = pool.submit(asyncio.run, _identity(address, timeout_s)).result()
        except (TimeoutError, OSError) as e:
            why = f" ({short_error(e)})" if str(e) else ""
            raise ConfigError(f"--cluster {address}: no Dask scheduler answered within {timeout_s:g} s{why}") from None
        except Exception as e:  # noqa: BLE001  (TLS settings, protocol errors: one line)
            raise ConfigError(f"--cluster {address}: cannot connect ({short_error(e)})") from None
    if not isinstance(info, dict) or info.get("type") != "Scheduler":
        kind = info.get("type") if isinstance(info, dict) else type(info).__name__
        raise ConfigError(f"--cluster {address}: a Dask {kind} answered, not a scheduler")


async def _identity(address: str, timeout_s: float) -> Any:
    from distributed.comm import connect
    from distributed.security import Security  # TLS certificates from Dask's config (README, Security defaults)

    async def ask() -> Any:
        comm = await connect(address, timeout=timeout_s, **Security().get_connection_args("client"))
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            await comm.close()

    return await asyncio.wait_for(ask(), timeout_s)


def make_task_runner(cfg: RunConfig):
    from prefect_dask import DaskTaskRunner

    from flows.dask_shutdown import LocalDaskTaskRunner

    if cfg.cluster.address:
        timeout = f"{cfg.cluster.connect_timeout_s}s"
        return DaskTaskRunner(address=cfg.cluster.address, client_kwargs={"timeout": timeout})
    n_workers, gpus = default_workers(cfg)
    host = cfg.cluster.host
    kwargs: dict[str, Any] = {
        "n_workers": n_workers,
        "threads_per_worker": cfg.cluster.threads_per_worker,
        "processes": True,
        "host": host,
        "dashboard_address": (f"[{host}]:8787" if ":" in host else f"{host}:8787") if cfg.cluster.dashboard else None,
    }
    if gpus:
        kwargs["resources"] = {"GPU": 1}
    return LocalDaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def execute_with_prefect(rt: Runtime, store: RunStore, plan: WorkPlan, on_done: OnDone | None = None) -> Outcome:
    """The plan as Prefect tasks on Dask workers (see :mod:`flows.prefect_flow`); failed units come back as text."""
    import dask

    from flows import progress
    from flows.prefect_flow import evaluation_flow

    cfg = rt.cfg
    n_workers, gpus = default_workers(cfg)
    threads = cfg.cluster.torch_threads or (torch_threads_for(n_workers) if not cfg.cluster.address else None)
    use_gpus = (
        cfg.cluster.gpu_resources if cfg.cluster.gpu_resources is not None else bool(gpus and not cfg.cluster.address)
    )
    runner = make_task_runner(cfg)
    progress.CALLBACK[0] = on_done
    announce_startup(cfg, n_workers)
    settings: dict[str, Any] = {"distributed.scheduler.allowed-failures": ALLOWED_WORKER_DEATHS}
    if cfg.cluster.address:  # a scheduler that stops answering fails the run instead of hanging it
        settings["distributed.comm.timeouts.connect"] = f"{cfg.cluster.connect_timeout_s}s"
    try:
        # The flow's LocalCluster (and so its scheduler) is created inside the flow, under these settings.
        with dask.config.set(settings), prefect_api():
            return evaluation_flow.with_options(task_runner=runner)(
                cfg.model_dump_json(), store, plan, threads, use_gpus
            )
    finally:
        progress.CALLBACK[0] = None


def announce_startup(cfg: RunConfig, n_workers: int) -> None:
    """Name the start-up phases of a Prefect + Dask run, and the links to its dashboards when they are on."""
    from flows.progress import phase

    api = configured_api_url()
    if api:
        phase(f"using the Prefect server at {api} (UI: {api.removesuffix('/api')})")
    else:
        phase("starting a temporary Prefect API on 127.0.0.1 (run `prefect server start` to keep one, with its UI)")
    if cfg.cluster.address:
        phase(f"submitting to the Dask cluster at {cfg.cluster.address}")
    else:
        phase(f"starting a local Dask cluster: {n_workers} worker process(es) on {cfg.cluster.host}")
        if cfg.cluster.dashboard:
            host = f"[{cfg.cluster.host}]" if ":" in cfg.cluster.host else cfg.cluster.host
            phase(f"Dask dashboard: http://{host}:8787/status (another port if 8787 is taken: see --verbose)")


def execute(rt: Runtime, store: RunStore, plan: WorkPlan, on_done: OnDone | None = None) -> Outcome:
    """Execute the plan the way the config asks (``cluster.in_process``); an empty plan does nothing."""
    if plan.empty:
        return {}
    executor = execute_in_process if rt.cfg.cluster.in_process else execute_with_prefect
    return executor(rt, store, plan, on_done)
