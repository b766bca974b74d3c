"""The two ways to execute a work plan, with the same outcome: in this process, in order (no Prefect, no Dask: the
reference the flow must match), or as Prefect tasks on a Dask cluster (local, or an existing scheduler).

Both take the planned units of :mod:`flows.planning` and return an :data:`~flows.planning.Outcome` per unit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from flows.cluster_setup import ALLOWED_WORKER_DEATHS, local_cluster_kwargs, machine_workers, torch_threads_for
from flows.planning import Outcome, WorkPlan
from flows.scheduler_check import check_scheduler, short_error
from flows.startup import EarlyCluster, Launch, default_workers, run_cluster_kwargs
from storage.cache import AdversarialCache
from storage.errors import DiskFullError
from storage.run_store import RunStore
from tasks.config import ConfigError, RunConfig
from tasks.runtime import Runtime
from tasks.shard_steps import attack_shard, defend_shard
from tasks.unit_cost import measure_passes

OnDone = Callable[[str], None]  # called with a unit's kind ("attack" | "defend") as each unit finishes


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
@contextlib.contextmanager
def local_cluster(n_workers: int | None = None, host: str = "127.0.0.1") -> Iterator[tuple[str, int, bool]]:
    """A LocalCluster shared by several runs (``equi demo``): (scheduler address, torch threads per worker, GPUs?)."""
    from distributed import LocalCluster

    from flows.dask_shutdown import quiet_cluster_workers

    n, gpus = machine_workers(n_workers)
    with LocalCluster(**local_cluster_kwargs(n, 1, host, False, gpus)) as cluster:
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


def make_task_runner(cfg: RunConfig, cluster_class: Callable[..., Any] | None = None):
    """The flow's task runner: on the scheduler of ``--cluster``, or on a LocalCluster made by ``cluster_class``
    (default: a new one when the flow starts; :class:`flows.startup.EarlyCluster`: one already starting)."""
    from prefect_dask import DaskTaskRunner

    from flows.dask_shutdown import LocalDaskTaskRunner

    if cfg.cluster.address:
        timeout = f"{cfg.cluster.connect_timeout_s}s"
        return DaskTaskRunner(address=cfg.cluster.address, client_kwargs={"timeout": timeout})
    return LocalDaskTaskRunner(
        cluster_class=cluster_class or "distributed.LocalCluster", cluster_kwargs=run_cluster_kwargs(cfg)
    )


def execute_with_prefect(
    rt: Runtime, store: RunStore, plan: WorkPlan, on_done: OnDone | None, launch: Launch
) -> Outcome:
    """The plan as Prefect tasks on Dask workers (see :mod:`flows.prefect_flow`), with the run's start-up ``launch``
    (:func:`execute` begins one when the caller did not); failed units come back as text."""
    import dask

    from flows import progress

    cfg = launch.cfg  # rt.cfg, or the same submitted to the warm cluster of `equi server`
    n_workers, gpus = default_workers(cfg)
    api = launch.open_api()
    launch.announce()
    if launch.warm is None:  # the launch named the warm cluster
        announce_cluster(cfg, n_workers)
    # The local cluster: begun with the launch, or now, in the background, while this process imports Prefect and
    # waits for the API.
    early = None if cfg.cluster.address else (launch.cluster or EarlyCluster(run_cluster_kwargs(cfg)))
    try:
        from flows.prefect_flow import evaluation_flow

        threads = cfg.cluster.torch_threads or (torch_threads_for(n_workers) if not cfg.cluster.address else None)
        use_gpus = (
            cfg.cluster.gpu_resources
            if cfg.cluster.gpu_resources is not None
            else bool(gpus and not cfg.cluster.address)
        )
        runner = make_task_runner(cfg, early.take if early is not None else None)
        plan = plan.prioritised(rt.shard_sizes(), measure_passes(cfg))
        progress.CALLBACK[0] = on_done
        settings: dict[str, Any] = {"distributed.scheduler.allowed-failures": ALLOWED_WORKER_DEATHS}
        if cfg.cluster.address:  # a scheduler that stops answering fails the run instead of hanging it
            settings["distributed.comm.timeouts.connect"] = f"{cfg.cluster.connect_timeout_s}s"
        with dask.config.set(settings), api.ready():
            return evaluation_flow.with_options(task_runner=runner)(
                cfg.model_dump_json(), store, plan, threads, use_gpus
            )
    finally:
        progress.CALLBACK[0] = None
        if early is not None:
            early.close_unused()
        launch.close()


def announce_cluster(cfg: RunConfig, n_workers: int) -> None:
    """Name the cluster a Prefect + Dask run uses, and the link to its dashboard when it is on."""
    from flows.progress import phase

    if cfg.cluster.address:
        phase(f"submitting to the Dask cluster at {cfg.cluster.address}")
    else:
        phase(f"starting a local Dask cluster: {n_workers} worker process(es) on {cfg.cluster.host}")
        if cfg.cluster.dashboard:
            host = f"[{cfg.cluster.host}]" if ":" in cfg.cluster.host else cfg.cluster.host
            phase(f"Dask dashboard: http://{host}:8787/status (another port if 8787 is taken: see --verbose)")


def execute(
    rt: Runtime, store: RunStore, plan: WorkPlan, on_done: OnDone | None = None, launch: Launch | None = None
) -> Outcome:
    """Execute the plan where the config asks (``cluster.in_process``, a scheduler, a local cluster) or, when it
    leaves that open, where :func:`flows.startup.small_run_reason` says; an empty plan does nothing."""
    from flows.progress import phase

    if plan.empty:
        if launch is not None:
            launch.close()  # nothing to run: a temporary API launched for it stops now
        return {}
    if rt.cfg.cluster.in_process:
        return execute_in_process(rt, store, plan, on_done)
    if launch is None:
        with Launch(rt.cfg) as own:
            return execute(rt, store, plan, on_done, own)
    n_units = len(plan.attack_units) + len(plan.defend_units)
    if reason := launch.small_run_reason(default_workers(rt.cfg)[0], n_units):
        launch.close()  # a temporary API launched before the plan was known stops now
        phase(f"running in this process: {reason} (--workers N runs it on a local Dask cluster)")
        return execute_in_process(rt, store, plan, on_done)
    return execute_with_prefect(rt, store, plan, on_done, launch)
