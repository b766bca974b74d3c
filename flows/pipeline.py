"""The evaluation flow: plan shards, attack each shard once per attack (Zarr cache), defend and score each
(attack, defense, shard) (one Parquet file each), reduce into the results table.

Everything is idempotent: work whose output already exists and verifies is not submitted again, so running the
same config twice, or ``equi resume RUN_ID`` after a crash, computes only what is missing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from storage import results as R
from storage.cache import AdversarialCache
from storage.errors import CacheCorruptError, CacheMissError, DiskFullError, ResultCorruptError, StorageError
from storage.locks import run_lock
from tasks import compute
from tasks.config import CLEAN, ConfigError, RunConfig
from tasks.paths import check_config_paths, check_output_tree
from tasks.reduce import reduce_run
from tasks.runtime import Runtime, build_runtime, code_version, plan_shards, torch_threads_for

# A task on a worker that dies (SIGKILL, OOM, preemption) is rescheduled on another worker up to this many times
# before Dask gives up on it (KilledWorker); set explicitly so a user's Dask config of 0 cannot turn it off.
ALLOWED_WORKER_DEATHS = 3


@dataclass
class WorkPlan:
    # (attack index, defense index, shard) still to compute; defense index -1 for attacks that do not see the
    # defense (their images serve every defense), the defense's index for BPDA/AA.
    attack_units: list[tuple[int, int, int]]
    defend_units: list[tuple[int, int, int]]  # (attack index, defense index, shard) still to compute
    n_shards: int
    total_defend: int
    repaired: list[str] = field(default_factory=list)  # damaged files found by their checksums, to be regenerated

    @property
    def empty(self) -> bool:
        return not self.attack_units and not self.defend_units


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


# ------------------------------------------------------------------------------------------------- provenance
def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("equirobust", "torch", "torchvision", "prefect", "prefect-dask", "distributed", "zarr", "pyarrow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def provenance(cfg: RunConfig) -> dict[str, Any]:
    return {
        "config_hash": cfg.config_hash(),
        "git_sha": git_sha(),
        "package_versions": package_versions(),
        "code_version": code_version(),
    }


# ------------------------------------------------------------------------------------------------- planning
def check_output_dirs(cfg: RunConfig) -> None:
    for what, d in (("results_dir", cfg.results_dir), ("cache_dir", cfg.cache_dir)):
        p = Path(d)
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{what}: {p} exists and is not a directory")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{what}: cannot create {p}: {e.strerror}") from None


def _reason(message: str) -> str:
    # Storage errors end with advice for API callers ("call invalidate(...)", "delete and recompute it"); the plan
    # does exactly that, so the report keeps only what was found.
    for advice in ("; call invalidate(", "; delete and recompute it"):
        message = message.split(advice)[0]
    return message


def _shard_file_problem(path: Path) -> str | None:
    """Why a committed shard file cannot be used (None if it reads back whole): footer, metric state and every
    page are checked against the checksums written with them, so a truncated or garbled file is never reduced."""
    try:
        R.read_shard(path)
    except FileNotFoundError:
        return None
    except ResultCorruptError as exc:
        return _reason(str(exc))
    return None


def plan_work(rt: Runtime, run_id: str, cache: AdversarialCache) -> WorkPlan:
    """What is left to compute. Damaged outputs (a shard file or cache entry failing its checksums) are removed
    here, reported in ``WorkPlan.repaired``, and planned again."""
    cfg = rt.cfg
    n_shards = len(plan_shards(rt.indices, cfg.shard_size))
    attack_units, defend_units, repaired = [], [], []
    for ai, attack in enumerate(cfg.attacks):
        # One attack unit per shard, or per (defense, shard) for defense-aware attacks.
        targets = sorted({compute.attack_defense_index(cfg, ai, di) for di in range(len(cfg.defenses))})
        for shard in range(n_shards):
            for di, defense in enumerate(cfg.defenses):
                a_key, d_key = compute.attack_key(rt, attack, defense), compute.defense_key(rt, attack, defense)
                path = R.shard_path(cfg.results_dir, run_id, a_key, d_key, shard)
                if not path.exists():
                    defend_units.append((ai, di, shard))
                    continue
                problem = _shard_file_problem(path)
                if problem:
                    repaired.append(f"{problem}; regenerating it")
                    R.discard_shard(path)
                    defend_units.append((ai, di, shard))
            if attack.name == CLEAN:
                continue
            for tdi in targets:
                a_key = compute.attack_key(rt, attack, compute.attack_defense(cfg, tdi))
                # A cache entry that fails its checksum (a corrupt or deleted chunk) is regenerated even when every
                # defense of the shard is done: the cache is shared with later runs and must stay trustworthy.
                try:
                    cache.read(a_key, shard)
                    continue
                except CacheMissError:
                    pass  # never completed (or its writer was killed before the marker): nothing to report
                except CacheCorruptError as exc:
                    repaired.append(f"attack {attack.name}: {_reason(str(exc))}; regenerating it")
                cache.invalidate(a_key, shard)
                attack_units.append((ai, tdi, shard))
    total = len(cfg.attacks) * len(cfg.defenses) * n_shards
    return WorkPlan(attack_units, defend_units, n_shards, total, repaired)


def unit_records(rt: Runtime) -> list[dict[str, Any]]:
    """The (attack, defense) units with their storage keys, so status/report need not rebuild the model."""
    out = []
    for attack in rt.cfg.attacks:
        for defense in rt.cfg.defenses:
            a_key = compute.attack_key(rt, attack, defense)
            d_key = compute.defense_key(rt, attack, defense)
            out.append(
                {
                    "attack": attack.name,
                    "defense": defense.name,
                    "attack_key": a_key,
                    "defense_key": d_key,
                    "unit_key": compute.unit_key(a_key, d_key),
                }
            )
    return out


def run_status(results_dir: str, run_id: str) -> dict[str, Any]:
    """Shards done / failed / pending per (attack, defense) unit, from the manifest and the files alone."""
    manifest = R.read_run_manifest(results_dir, run_id)
    failed = {(f["unit_key"], int(f["shard"])): f for f in R.failures(results_dir, run_id)}
    units = []
    for u in manifest.get("units", []):
        done, bad, pending = 0, [], 0
        for shard in range(int(manifest["n_shards"])):
            if R.shard_done(results_dir, run_id, u["attack_key"], u["defense_key"], shard):
                done += 1
            elif (u["unit_key"], shard) in failed or (u["attack_key"], shard) in failed:
                f = failed.get((u["unit_key"], shard)) or failed[(u["attack_key"], shard)]
                bad.append({"shard": shard, "error": f.get("error", ""), "attempts": f.get("attempts")})
            else:
                pending += 1
        units.append({**u, "done": done, "failed": bad, "pending": pending})
    return {"manifest": manifest, "units": units}


def write_manifest(cfg: RunConfig, run_id: str, rt: Runtime, status: str, extra: dict[str, Any] | None = None):
    manifest = {
        "run_id": run_id,
        "name": cfg.name,
        "status": status,
        "config": cfg.model_dump(mode="json"),
        "n_samples": len(rt.indices),
        "n_shards": len(plan_shards(rt.indices, cfg.shard_size)),
        "updated_at": dt.datetime.now(dt.UTC).isoformat(),
        "units": unit_records(rt),
        **provenance(cfg),
        **(extra or {}),
    }
    with contextlib.suppress(StorageError):
        old = R.read_run_manifest(cfg.results_dir, run_id)
        manifest.setdefault("created_at", old.get("created_at"))
    manifest.setdefault("created_at", manifest["updated_at"])
    if manifest["created_at"] is None:
        manifest["created_at"] = manifest["updated_at"]
    R.write_run_manifest(cfg.results_dir, run_id, manifest)


# ------------------------------------------------------------------------------------------------- execution
Outcome = dict[tuple, tuple[str, str]]  # unit -> ("ok" | "failed", message)


def _short_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:500]


def execute_in_process(rt: Runtime, run_id: str, plan: WorkPlan, on_done=None) -> Outcome:
    """The same steps, sequentially in this process (no Prefect, no Dask): the reference the flow must match."""
    if rt.cfg.cluster.torch_threads:
        import torch

        torch.set_num_threads(rt.cfg.cluster.torch_threads)
    cache = AdversarialCache(rt.cfg.cache_dir)
    outcome: Outcome = {}
    for ai, tdi, shard in plan.attack_units:
        try:
            compute.attack_shard(rt, cache, rt.cfg.attacks[ai], shard, compute.attack_defense(rt.cfg, tdi))
            outcome[("attack", ai, tdi, shard)] = ("ok", "")
        except DiskFullError:
            raise  # every later shard would fail the same way: stop, keeping what is done
        except Exception as e:  # noqa: BLE001  (recorded as a failed shard; the run goes on)
            outcome[("attack", ai, tdi, shard)] = ("failed", _short_error(e))
        if on_done:
            on_done("attack")
    for ai, di, shard in plan.defend_units:
        upstream = ("attack", ai, compute.attack_defense_index(rt.cfg, ai, di), shard)
        if outcome.get(upstream, ("ok", ""))[0] == "failed":
            outcome[("defend", ai, di, shard)] = ("failed", "skipped: its attack shard failed")
        else:
            try:
                compute.defend_shard(rt, cache, rt.cfg.attacks[ai], rt.cfg.defenses[di], shard, run_id)
                outcome[("defend", ai, di, shard)] = ("ok", "")
            except DiskFullError:
                raise
            except Exception as e:  # noqa: BLE001
                outcome[("defend", ai, di, shard)] = ("failed", _short_error(e))
        if on_done:
            on_done("defend")
    return outcome


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """One temporary Prefect API for the flow and all Dask workers (unless the user points at a server).

    Without this, every worker process would start its own ephemeral server on the same SQLite file.
    """
    from prefect.settings import get_current_settings

    if os.environ.get("PREFECT_API_URL") or get_current_settings().api.url:  # a server the user runs (with the UI)
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
        yield cluster.scheduler_address, torch_threads_for(n), bool(gpus)


def run_many(cfgs: list[RunConfig], n_workers: int | None = None, runner=None) -> Iterator[RunSummary]:
    """Run several configs on ONE LocalCluster and ONE Prefect API (``equi demo``, benchmarks): starting them per
    run would cost more than a small run. ``runner(cfg)`` runs one config (default :func:`run`). Yields summaries."""
    runner = runner or run
    with local_cluster(n_workers) as (address, threads, gpus), prefect_api():
        for cfg in cfgs:
            data = cfg.model_dump(mode="json")
            data["cluster"].update(address=address, torch_threads=threads, gpu_resources=gpus)
            yield runner(RunConfig.model_validate(data))


def make_task_runner(cfg: RunConfig):
    from prefect_dask import DaskTaskRunner

    if cfg.cluster.address:
        return DaskTaskRunner(address=cfg.cluster.address)
    n_workers, gpus = default_workers(cfg)
    kwargs: dict[str, Any] = {
        "n_workers": n_workers,
        "threads_per_worker": cfg.cluster.threads_per_worker,
        "processes": True,
        "host": cfg.cluster.host,
        "dashboard_address": f"{cfg.cluster.host}:8787" if cfg.cluster.dashboard else None,
    }
    if gpus:
        kwargs["resources"] = {"GPU": 1}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def execute_with_prefect(rt: Runtime, run_id: str, plan: WorkPlan, on_done=None) -> Outcome:
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
    try:
        # The flow's LocalCluster (and so its scheduler) is created inside the flow, under this setting.
        with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_WORKER_DEATHS}), prefect_api():
            return evaluation_flow.with_options(task_runner=runner)(
                cfg.model_dump_json(),
                run_id,
                [list(u) for u in plan.attack_units],
                [list(u) for u in plan.defend_units],
                threads,
                use_gpus,
            )
    finally:
        progress.CALLBACK[0] = None


def run(cfg: RunConfig, *, on_plan=None, on_done=None) -> RunSummary:
    """Run (or resume) a config. ``on_plan(plan)`` and ``on_done(kind)`` drive progress displays.

    One process at a time per run id (a second one gets RunLockedError). A full disk stops the run with
    DiskFullError; everything finished before it is kept and ``equi resume`` picks up from there.
    """
    t0 = time.perf_counter()
    run_id = cfg.run_id()
    # Check paths, then build (and so validate) dataset, model and adapter, before anything is written.
    check_config_paths(cfg)
    rt = build_runtime(cfg)
    compute.preflight_defenses(rt)
    check_output_dirs(cfg)
    check_output_tree(cfg)
    try:
        with run_lock(cfg.results_dir, run_id):
            return _run_locked(cfg, rt, run_id, t0, on_plan, on_done)
    except DiskFullError as exc:
        resumable = R.list_runs(cfg.results_dir).count(run_id)
        hint = f"`equi resume {run_id}`" if resumable else "run the same config again"
        raise DiskFullError(f"{exc}; every finished shard is kept: free some space, then {hint}") from exc


def _disk_full(outcome: Outcome) -> str | None:
    """The first shard failure caused by a full disk (tasks on workers report it as text)."""
    prefix = f"{DiskFullError.__name__}: "
    return next((msg[len(prefix) :] for _state, msg in outcome.values() if msg.startswith(prefix)), None)


def _run_locked(cfg: RunConfig, rt: Runtime, run_id: str, t0: float, on_plan, on_done) -> RunSummary:
    write_manifest(cfg, run_id, rt, "running")
    plan = plan_work(rt, run_id, AdversarialCache(cfg.cache_dir))
    if on_plan:
        on_plan(plan)
    outcome: Outcome = {}
    if not plan.empty:
        executor = execute_in_process if cfg.cluster.in_process else execute_with_prefect
        outcome = executor(rt, run_id, plan, on_done)
    full = _disk_full(outcome)
    if full:
        raise DiskFullError(full)  # before recording failures: they would be written to the same full disk
    failed = record_outcome(cfg, rt, run_id, outcome)
    reduce_run(rt, run_id, provenance(cfg))
    status = "failed" if failed else "complete"
    write_manifest(cfg, run_id, rt, status, {"failed_units": len(failed), "repaired": plan.repaired})
    computed = sum(1 for k, (s, _) in outcome.items() if s == "ok" and k[0] == "defend")
    return RunSummary(
        run_id=run_id,
        results_dir=cfg.results_dir,
        n_samples=len(rt.indices),
        n_shards=plan.n_shards,
        computed=computed,
        skipped=plan.total_defend - len(plan.defend_units),
        failed=failed,
        seconds=time.perf_counter() - t0,
        repaired=plan.repaired,
    )


def record_outcome(cfg: RunConfig, rt: Runtime, run_id: str, outcome: Outcome) -> list[dict[str, Any]]:
    failed = []
    for unit, (status, message) in sorted(outcome.items(), key=lambda kv: str(kv[0])):
        if unit[0] == "attack":
            _, ai, tdi, shard = unit
            target = compute.attack_defense(cfg, tdi)
            key = compute.unit_key(compute.attack_key(rt, cfg.attacks[ai], target))
            label = f"attack {cfg.attacks[ai].name}" + (f" against {target.name}" if target is not None else "")
        else:
            _, ai, di, shard = unit
            attack, defense = cfg.attacks[ai], cfg.defenses[di]
            key = compute.unit_key(compute.attack_key(rt, attack, defense), compute.defense_key(rt, attack, defense))
            label = f"attack {attack.name} / defense {defense.name}"
        if status == "ok":
            R.clear_failed(cfg.results_dir, run_id, key, shard)
        else:
            R.mark_failed(cfg.results_dir, run_id, key, shard, f"{label}: {message}")
            failed.append({"unit": label, "shard": shard, "error": message})
    return failed


def resume(run_id: str, results_dir: str) -> RunSummary:
    manifest = R.read_run_manifest(results_dir, run_id)
    cfg = RunConfig.model_validate(manifest["config"])
    if cfg.run_id() != run_id:
        raise ConfigError(f"run {run_id}: its manifest's config hashes to {cfg.run_id()} (edited by hand?)")
    return run(cfg)
