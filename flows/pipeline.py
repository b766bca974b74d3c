"""The evaluation flow: plan shards, attack each shard once per attack (Zarr cache), defend and score each
(attack, defense, shard) (one Parquet file each), reduce into the results table.

Everything is idempotent: work whose output already exists and verifies is not submitted again, so running the
same config twice, or ``equi resume RUN_ID`` after a crash, computes only what is missing.

Where the steps live: :mod:`tasks.units` (the planned units and their keys), :mod:`flows.planning` (what is left),
:mod:`flows.execution` (in process, or Prefect over Dask), :mod:`tasks.reduce`, :mod:`flows.manifest`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equicore.datasets.scan import check_samples
from flows.execution import OnDone, check_cluster, execute, local_cluster
from flows.manifest import provenance, write_manifest
from flows.planning import Outcome, WorkPlan, plan_work
from flows.prefect_api import EQUI_SERVER, choose_api, open_api
from flows.progress import phase
from flows.startup import Launch, on_scheduler
from flows.warm_cluster import recorded_cluster
from storage.cache import AdversarialCache
from storage.errors import DiskFullError
from storage.run_store import RunStore
from tasks.config import ConfigError, RunConfig
from tasks.config_checks import without_network
from tasks.paths import check_config_paths, check_output_tree
from tasks.reduce import reduce_run
from tasks.runtime import build_runtime
from tasks.shard_steps import preflight_defenses
from tasks.units import DefendUnit, outcome_order, plan_units


@dataclass
class RunSummary:
    run_id: str
    results_dir: str
    n_samples: int
    n_shards: int
    computed: int
    skipped: int
    failed: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def run(
    cfg: RunConfig,
    *,
    on_plan: Callable[[WorkPlan], None] | None = None,
    on_done: OnDone | None = None,
    launch: Launch | None = None,
) -> RunSummary:
    """Run (or resume) a config. ``on_plan(plan)`` and ``on_done(kind)`` drive progress displays. ``launch``: its
    start-up, begun by the caller (``equi run`` begins it before importing the engine); default: begun here.

    One process at a time per run id (a second one gets RunLockedError). A full disk stops the run with
    DiskFullError; everything finished before it is kept and ``equi resume`` picks up from there.
    """
    started = time.perf_counter()
    # Check paths, then build (and so validate) dataset, model and adapter, before anything is written.
    check_config_paths(cfg)
    if cfg.cluster.address:
        phase(f"connecting to the Dask scheduler at {cfg.cluster.address}")
    check_cluster(cfg)  # a scheduler that does not answer fails here, in one line, not after the manifest is written
    # A temporary Prefect API (when the run may need one) starts now, in the background, while the model loads.
    with contextlib.nullcontext(launch) if launch is not None else Launch(cfg) as begun:
        return _run(begun.cfg, begun, started, on_plan, on_done)  # begun.cfg: on the warm cluster, if it uses it


def _run(
    cfg: RunConfig,
    launch: Launch,
    started: float,
    on_plan: Callable[[WorkPlan], None] | None,
    on_done: OnDone | None,
) -> RunSummary:
    store = RunStore(cfg.results_dir, cfg.run_id())
    phase(f"loading dataset {cfg.dataset.name} and model {cfg.model.label}")
    rt = build_runtime(cfg)
    phase(f"checking that the {len(rt.indices)} selected images decode")
    check_samples(rt.dataset, rt.indices)  # every selected image decodes: a bad file is named now, not mid-run
    phase("planning: resolving every (attack, defense) pair and checking what is already done")
    units = plan_units(rt)  # every (attack, defense) pair resolved and keyed, once
    preflight_defenses(rt, units)
    check_output_dirs(cfg)
    check_output_tree(cfg)
    with resume_hint_when_disk_full(store), store.lock():
        launch.start_cluster()  # checks passed: the local cluster (if the run surely needs one) starts while it plans
        write_manifest(store, rt, units, "running")
        plan = plan_work(units, store, AdversarialCache(cfg.cache_dir))  # what is left; damaged files regenerate
        if on_plan:
            on_plan(plan)
        outcome = execute(rt, store, plan, on_done, launch)  # in process, or Prefect tasks on Dask workers
        full = disk_full_message(outcome)
        if full:
            raise DiskFullError(full)  # before recording failures: they would be written to the same full disk
        failed = record_outcome(store, outcome)
        reduce_run(rt, units, store, provenance(cfg))
        status = "failed" if failed else "complete"
        write_manifest(store, rt, units, status, {"failed_units": len(failed), "repaired": plan.repaired})
        return RunSummary(
            run_id=store.run_id,
            results_dir=cfg.results_dir,
            n_samples=len(rt.indices),
            n_shards=plan.n_shards,
            computed=sum(1 for u, (s, _) in outcome.items() if s == "ok" and isinstance(u, DefendUnit)),
            skipped=plan.total_defend - len(plan.defend_units),
            failed=failed,
            seconds=time.perf_counter() - started,
            repaired=plan.repaired,
        )


def resume(store: RunStore) -> RunSummary:
    """Run again the config recorded in a run's manifest (computes only what is missing or damaged)."""
    manifest = store.read_manifest()
    cfg = RunConfig.model_validate(without_network(manifest["config"]))  # --cluster / --listen are not recorded
    if cfg.run_id() != store.run_id:
        raise ConfigError(f"run {store.run_id}: its manifest's config hashes to {cfg.run_id()} (edited by hand?)")
    return run(cfg)


def run_many(
    cfgs: list[RunConfig], n_workers: int | None = None, runner: Callable[[RunConfig], RunSummary] | None = None
) -> Iterator[RunSummary]:
    """Run several configs on ONE LocalCluster and ONE Prefect API (``equi demo``, benchmarks): starting them per
    run would cost more than a small run; with the results directory's ``equi server`` keeping a warm cluster and
    ``n_workers`` not given, on that cluster. ``runner(cfg)`` runs one config (default :func:`run`). Yields
    summaries."""
    runner = runner or run
    results_dirs = {cfg.results_dir for cfg in cfgs}
    choice = choose_api(results_dirs.pop() if len(results_dirs) == 1 else None)
    if n_workers is None and choice.source == EQUI_SERVER and recorded_cluster(cfgs[0].results_dir) is not None:
        yield from map(runner, cfgs)  # each run submits to the warm cluster of `equi server` (flows.startup.Launch)
        return
    # The API first (a temporary one launched, not waited for), so that it starts while the cluster does.
    with open_api(choice) as api, local_cluster(n_workers) as (address, threads, gpus), api.ready():
        for cfg in cfgs:
            yield runner(cfg if cfg.cluster.in_process else on_scheduler(cfg, address, threads, gpus))


# ------------------------------------------------------------------------------------------------- steps of run()
def check_output_dirs(cfg: RunConfig) -> None:
    for what, d in (("results_dir", cfg.results_dir), ("cache_dir", cfg.cache_dir)):
        p = Path(d)
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{what}: {p} exists and is not a directory")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{what}: cannot create {p}: {e.strerror}") from None


@contextlib.contextmanager
def resume_hint_when_disk_full(store: RunStore) -> Iterator[None]:
    """A full disk's error says that every finished shard is kept, and how to pick up from there."""
    try:
        yield
    except DiskFullError as exc:
        hint = f"`equi resume {store.run_id}`" if store.has_manifest() else "run the same config again"
        raise DiskFullError(f"{exc}; every finished shard is kept: free some space, then {hint}") from exc


def disk_full_message(outcome: Outcome) -> str | None:
    """The first shard failure caused by a full disk (tasks on workers report it as text)."""
    prefix = f"{DiskFullError.__name__}: "
    return next((msg[len(prefix) :] for _state, msg in outcome.values() if msg.startswith(prefix)), None)


def record_outcome(store: RunStore, outcome: Outcome) -> list[dict[str, Any]]:
    """Clear the failure record of every unit that succeeded, write one for every unit that failed; the failures,
    for the summary."""
    failed = []
    for unit in outcome_order(list(outcome)):
        status, message = outcome[unit]
        if status == "ok":
            store.clear_failed(unit.unit_key, unit.shard)
        else:
            store.mark_failed(unit.unit_key, unit.shard, f"{unit.label}: {message}")
            failed.append({"unit": unit.label, "shard": unit.shard, "error": message})
    return failed
