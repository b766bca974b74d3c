"""Prefect tasks: one shard-level step each. Thin wrappers over :mod:`tasks.compute`; the heavy state (model,
dataset) is cached per worker process by :func:`tasks.runtime.get_runtime`.

Retries: transient failures (a preempted worker, a flaky disk) are retried with backoff; errors that retrying
cannot fix (bad input, a missing checkpoint) fail at once.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from equicore.errors import EquirobustError
from storage.cache import AdversarialCache
from tasks import compute
from tasks.runtime import get_runtime


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
    task_run_name="attack[{attack_index}] against[{defense_index}] shard {shard}",
)
def attack_shard_task(
    cfg_json: str, attack_index: int, defense_index: int, shard: int, torch_threads: int | None = None
) -> dict[str, Any]:
    """``defense_index`` is -1 unless the attack is defense-aware (BPDA, AA)."""
    rt = get_runtime(cfg_json, torch_threads)
    attack, defense = rt.cfg.attacks[attack_index], compute.attack_defense(rt.cfg, defense_index)
    return compute.attack_shard(rt, AdversarialCache(rt.cfg.cache_dir), attack, shard, defense)


@task(
    name="defend-shard",
    cache_policy=NO_CACHE,
    retry_condition_fn=_retryable,
    task_run_name="attack[{attack_index}] defense[{defense_index}] shard {shard}",
)
def defend_shard_task(
    cfg_json: str, run_id: str, attack_index: int, defense_index: int, shard: int, torch_threads: int | None = None
) -> dict[str, Any]:
    rt = get_runtime(cfg_json, torch_threads)
    attack, defense = rt.cfg.attacks[attack_index], rt.cfg.defenses[defense_index]
    return compute.defend_shard(rt, AdversarialCache(rt.cfg.cache_dir), attack, defense, shard, run_id)
