"""The Prefect flow: submits shard tasks to the Dask task runner and collects their final states.

Attack tasks run first; each defense task of a shard waits for that shard's attack task. A failed task (after its
retries) is reported back as a failed unit; it does not fail the flow, so every other shard completes.
"""

from __future__ import annotations

from typing import Any

import dask
from prefect import flow
from prefect.futures import as_completed

from flows import progress
from flows.planning import Outcome, WorkPlan
from flows.prefect_tasks import attack_shard_task, defend_shard_task
from storage.run_store import RunStore
from tasks.config import RunConfig
from tasks.units import AttackUnit, DefendUnit


def _final(fut) -> tuple[bool, str]:
    """(completed, error message). Waits for the final state: ``fut.state`` alone may still be the API's stale view."""
    try:
        res = fut.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001
        res = e
    state = fut.state
    if state.is_completed() and not isinstance(res, BaseException):
        return True, ""
    if isinstance(res, BaseException):
        text = str(res).strip().splitlines()[0] if str(res).strip() else ""
        return False, f"{type(res).__name__}: {text}"[:500]
    return False, (state.message or state.name or "did not complete")[:500]


@flow(name="equirobust-evaluate", log_prints=False, validate_parameters=False)
def evaluation_flow(
    cfg_json: str, store: RunStore, plan: WorkPlan, torch_threads: int | None, use_gpus: bool
) -> Outcome:
    on_done = progress.CALLBACK[0]  # not a parameter: parameters are serialised for the Prefect API
    cfg = RunConfig.model_validate_json(cfg_json)
    opts = {"retries": cfg.retries, "retry_delay_seconds": list(cfg.retry_delay_s) or 0}
    attack_task = attack_shard_task.with_options(**opts)
    defend_task = defend_shard_task.with_options(**opts)
    annotations = {"resources": {"GPU": 1}} if use_gpus else {}
    futures: dict[Any, AttackUnit | DefendUnit] = {}
    attack_futs: dict[AttackUnit, Any] = {}

    def annotated(unit: AttackUnit | DefendUnit):
        """Each unit with its priority: the longest chains of work start first, short units fill the end."""
        return dask.annotate(priority=plan.priorities.get(unit, 0), **annotations)

    for unit in plan.attack_units:
        with annotated(unit):
            fut = attack_task.submit(cfg_json, unit, torch_threads)
        attack_futs[unit] = fut
        futures[fut] = unit
    for unit in plan.defend_units:
        upstream = attack_futs.get(unit.upstream)  # None: its images are clean or cached before this run
        wait_for = [upstream] if upstream is not None else None
        with annotated(unit):
            fut = defend_task.submit(cfg_json, store, unit, torch_threads, wait_for=wait_for)
        futures[fut] = unit
    outcome: Outcome = {}
    for fut in as_completed(list(futures)):
        unit = futures[fut]
        completed, message = _final(fut)
        outcome[unit] = ("ok", "") if completed else ("failed", message)
        if on_done:
            on_done(unit.kind)
    return outcome
