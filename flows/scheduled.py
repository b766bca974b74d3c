"""Scheduled (overnight) runs: a Prefect deployment whose flow runs a config file on a cron schedule.

``equi deploy CONFIG --cron ...`` registers the deployment on a Prefect server that keeps schedules (see
:mod:`flows.prefect_server`: ``PREFECT_API_URL``, the server ``equi server start`` left running for the config's
results directory, or one it starts itself with ``--start-server``) and serves it: this process polls the server
and runs each scheduled flow run in a subprocess. Without a server it refuses, naming the two commands to run,
instead of registering a schedule that nothing would ever fire.

Each run logs its start, its end and every failed shard (one line each, with the error); a run with failed shards
ends in Prefect's **Failed** state after its results were written, so a night that lost shards is not shown as
Completed. Same config -> same run id: a night's run that was cut short is finished by the next night's run without
redoing completed shards.
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Failed

from equicore.errors import EquirobustError, InvalidInputError
from flows.prefect_api import configured_api_url
from flows.prefect_server import ServerError, ServerInfo, api_error, running_server, start_server
from storage.errors import StorageError
from tasks.config import load_config

FLOW_NAME = "equirobust-scheduled"


@flow(name=FLOW_NAME, log_prints=False)
def scheduled_run(config_path: str) -> Any:
    """Run (or resume) the config at ``config_path``; Failed (after writing what it could) when shards failed."""
    from flows import pipeline

    logger = get_run_logger()
    logger.info(f"starting: config {config_path}")
    try:
        cfg = load_config(config_path)
        run_id = cfg.run_id()

        def on_plan(plan) -> None:
            todo = f"{len(plan.attack_units)} attack and {len(plan.defend_units)} defense shard(s) to compute"
            logger.info(f"run {run_id}: {todo} ({plan.total_defend - len(plan.defend_units)} done before)")

        summary = pipeline.run(cfg, on_plan=on_plan)
    except (EquirobustError, StorageError) as e:  # bad config, run locked by last night's run, disk full, ...
        logger.error(f"failed: {e}")
        return Failed(message=str(e)[:500])
    for f in summary.failed:
        logger.error(f"failed shard: {f['unit']} shard {f['shard']}: {f['error']}")
    done = f"{summary.computed} computed, {summary.skipped} done before, {len(summary.failed)} failed"
    logger.info(f"finished: run {summary.run_id}: {done} ({summary.seconds:.1f} s); results in {summary.results_dir}")
    if summary.failed:
        return Failed(
            message=f"run {summary.run_id}: {len(summary.failed)} shard(s) failed; `equi status {summary.run_id}` "
            f"lists them, `equi resume {summary.run_id}` recomputes only those"
        )
    return {"run_id": summary.run_id, "computed": summary.computed, "skipped": summary.skipped, "failed": []}


# ------------------------------------------------------------------------------------------------ validation
def _validate_cron(cron: str) -> str:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise InvalidInputError(f"--cron: {cron!r} is not a valid cron expression (e.g. '0 2 * * *')") from None
    return cron


def local_timezone() -> str:
    """The machine's IANA time zone (a nightly 02:00 means 02:00 here, not in UTC); UTC when unknown."""
    try:
        import tzlocal

        return tzlocal.get_localzone_name() or "UTC"
    except Exception:  # noqa: BLE001  (no tzlocal, or an unnamed zone)
        return os.environ.get("TZ") or "UTC"


def _validate_timezone(tz: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInputError(f"--timezone: {tz!r} is not an IANA time zone (e.g. 'Europe/Berlin', 'UTC')") from None
    return tz


def next_run(cron: str, tz: str) -> datetime | None:
    """When the schedule fires next (for the starting message only; None if it cannot be computed here)."""
    try:
        from zoneinfo import ZoneInfo

        from prefect._vendor.croniter import croniter  # what Prefect itself schedules with

        return croniter(cron, datetime.now(ZoneInfo(tz))).get_next(datetime)
    except Exception:  # noqa: BLE001  (a private module of Prefect: a display nicety, never an error)
        return None


def _schedule(cron: str, tz: str):
    from prefect.schedules import Cron

    return Cron(cron, timezone=tz)


def build_deployment(config: Path, cron: str, name: str | None = None, tz: str | None = None) -> dict[str, Any]:
    """Validate CONFIG, the cron expression and the time zone; what would be registered (``--dry-run``)."""
    cfg = load_config(config)
    _validate_cron(cron)
    tz = _validate_timezone(tz or local_timezone())
    dep = scheduled_run.to_deployment(
        name=name or cfg.name, schedule=_schedule(cron, tz), parameters={"config_path": str(Path(config).resolve())}
    )
    nxt = next_run(cron, tz)
    return {
        "name": dep.name,
        "flow": FLOW_NAME,
        "schedule": cron,
        "timezone": tz,
        "next_run": nxt.isoformat() if nxt else None,
        "parameters": dep.parameters,
        "run_id": cfg.run_id(),
        "results_dir": cfg.results_dir,
    }


# ------------------------------------------------------------------------------------------------ which server
def resolve_server(
    results_dir: str, *, start: bool, port: int | None, deploy_command: str
) -> tuple[str, ServerInfo | None]:
    """The API to deploy on, and the server this command started (to stop when it stops), if any.

    In order: PREFECT_API_URL (it must answer); the server ``equi server start`` left running for the config's
    results directory; a new one when ``start``; else ServerError naming the two commands to run (the second is
    ``deploy_command``)."""
    if url := configured_api_url():
        if why := api_error(url):
            raise ServerError(
                f"PREFECT_API_URL={url} does not answer ({why}): start that server, or unset PREFECT_API_URL to use "
                f"`equi server start -r {results_dir}`"
            )
        return url, None
    if (info := running_server(results_dir)) is not None:
        if why := api_error(info.api_url):
            raise ServerError(
                f"the Prefect server of {results_dir} (pid {info.pid}, {info.api_url}) does not answer ({why}); "
                f"see its log {info.log}, or `equi server stop -r {results_dir}` and start it again"
            )
        return info.api_url, None
    if start:
        info, _started = start_server(results_dir, port, started_by="equi deploy")
        return info.api_url, info
    raise ServerError(
        "no Prefect server to keep the schedule (Prefect's temporary server forgets it when this command exits, and "
        f"nothing would ever run); run `equi server start -r {shlex.quote(str(results_dir))}`, then "
        f"`{deploy_command}` (or add --start-server)"
    )


# ------------------------------------------------------------------------------------------------ serving
def serve(config: Path, cron: str, name: str | None, tz: str, api_url: str, *, verbose: bool = False) -> None:
    """Register the deployment on ``api_url`` and run its scheduled flow runs until SIGINT/SIGTERM (then return;
    Prefect pauses the schedule so runs do not pile up as Late while nobody serves them)."""
    import logging

    from prefect.settings import PREFECT_API_URL, temporary_settings

    cfg = load_config(config)
    # The flow-run subprocesses read the environment; this process's settings were read at import.
    os.environ["PREFECT_API_URL"] = api_url
    if not verbose:
        # Each run's own lines (start, failed shards, end) at INFO; the rest of Prefect stays at WARNING.
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "INFO")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
        logging.getLogger("prefect.flow_runs.runner").setLevel(logging.WARNING)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        scheduled_run.serve(
            name=name or cfg.name,
            schedule=_schedule(cron, tz),
            parameters={"config_path": str(Path(config).resolve())},
            print_starting_message=False,  # the CLI prints its own line (Prefect's names `prefect deployment run`)
            pause_on_shutdown=True,
        )
