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
from tasks.compute import attack_defense_index
from tasks.config import RunConfig
from tasks.prefect_tasks import attack_shard_task, defend_shard_task


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
    cfg_json: str,
    run_id: str,
    attack_units: list[list[int]],
    defend_units: list[list[int]],
    torch_threads: int | None,
    use_gpus: bool,
) -> dict[tuple, tuple[str, str]]:
    on_done = progress.CALLBACK[0]  # not a parameter: parameters are serialised for the Prefect API
    cfg = RunConfig.model_validate_json(cfg_json)
    opts = {"retries": cfg.retries, "retry_delay_seconds": list(cfg.retry_delay_s) or 0}
    attack_task = attack_shard_task.with_options(**opts)
    defend_task = defend_shard_task.with_options(**opts)
    annotations = {"resources": {"GPU": 1}} if use_gpus else {}
    futures: dict[Any, tuple] = {}
    attack_futs = {}
    with dask.annotate(**annotations):
        for ai, tdi, shard in attack_units:
            fut = attack_task.submit(cfg_json, ai, tdi, shard, torch_threads)
            attack_futs[(ai, tdi, shard)] = fut
            futures[fut] = ("attack", ai, tdi, shard)
        for ai, di, shard in defend_units:
            upstream = attack_futs.get((ai, attack_defense_index(cfg, ai, di), shard))
            fut = defend_task.submit(
                cfg_json, run_id, ai, di, shard, torch_threads, wait_for=[upstream] if upstream else None
            )
            futures[fut] = ("defend", ai, di, shard)
    outcome: dict[tuple, tuple[str, str]] = {}
    for fut in as_completed(list(futures)):
        unit = futures[fut]
        completed, message = _final(fut)
        outcome[unit] = ("ok", "") if completed else ("failed", message)
        if on_done:
            on_done(unit[0])
    return outcome
