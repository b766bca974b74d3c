"""Prefect tasks: one shard-level step each. Thin wrappers over :mod:`tasks.shard_steps`, given a planned unit of
:mod:`tasks.units` (a picklable value, keys included); the heavy state (model, dataset) is cached per worker process
by :func:`tasks.runtime.get_runtime`.

Retries: transient failures (a preempted worker, a flaky disk) are retried with backoff; errors that retrying
cannot fix (bad input, a missing checkpoint) fail at once.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from equicore.errors import EquirobustError
from storage.cache import AdversarialCache
from storage.run_store import RunStore
from tasks.runtime import get_runtime
from tasks.shard_steps import attack_shard, defend_shard
from tasks.units import AttackUnit, DefendUnit


def _retryable(task_obj, task_run, state) -> bool:
    try:
        state.result()
    except EquirobustError:
        return False
    except Exception:  # noqa: BLE001  (anything else may be transient)
        return True
    return True


@task(
    name="attack-shard",
    cache_policy=NO_CACHE,
    retry_condition_fn=_retryable,
    task_run_name="attack[{unit.spec.attack_index}] against[{unit.spec.target_index}] shard {unit.shard}",
)
def attack_shard_task(cfg_json: str, unit: AttackUnit, torch_threads: int | None = None) -> dict[str, Any]:
    """The unit's target index is -1 unless the attack is defense-aware (BPDA, AA)."""
    rt = get_runtime(cfg_json, torch_threads)
    return attack_shard(rt, AdversarialCache(rt.cfg.cache_dir), unit)


@task(
    name="defend-shard",
    cache_policy=NO_CACHE,
    retry_condition_fn=_retryable,
    task_run_name="attack[{unit.spec.attack_index}] defense[{unit.spec.defense_index}] shard {unit.shard}",
)
def defend_shard_task(
    cfg_json: str, store: RunStore, unit: DefendUnit, torch_threads: int | None = None
) -> dict[str, Any]:
    rt = get_runtime(cfg_json, torch_threads)
    return defend_shard(rt, AdversarialCache(rt.cfg.cache_dir), store, unit)
