"""Scheduled (overnight) runs: a Prefect deployment whose flow runs a config file on a cron schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from tasks.config import load_config


@flow(name="equirobust-scheduled", log_prints=True)
def scheduled_run(config_path: str) -> dict[str, Any]:
    """Run (or resume) the config at ``config_path``; same config -> same run id, so a nightly run that was cut
    short is finished by the next night's run without redoing completed shards."""
    from flows import pipeline

    summary = pipeline.run(load_config(config_path))
    done = f"{summary.computed} computed, {summary.skipped} done before"
    print(f"run {summary.run_id}: {done}, {len(summary.failed)} failed")
    return {"run_id": summary.run_id, "failed": summary.failed}


def _validate_cron(cron: str) -> str:
    from prefect.client.schemas.schedules import CronSchedule

    from equicore.errors import InvalidInputError

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise InvalidInputError(f"--cron: {cron!r} is not a valid cron expression (e.g. '0 2 * * *')") from None
    return cron


def build_deployment(config: Path, cron: str, name: str | None = None) -> dict[str, Any]:
    cfg = load_config(config)
    _validate_cron(cron)
    dep = scheduled_run.to_deployment(
        name=name or cfg.name, cron=cron, parameters={"config_path": str(Path(config).resolve())}
    )
    return {
        "name": dep.name,
        "flow": "equirobust-scheduled",
        "schedule": cron,
        "parameters": dep.parameters,
        "run_id": cfg.run_id(),
    }


def serve(config: Path, cron: str, name: str | None = None) -> None:
    cfg = load_config(config)
    _validate_cron(cron)
    scheduled_run.serve(name=name or cfg.name, cron=cron, parameters={"config_path": str(Path(config).resolve())})
