"""``equi tune``: search a defense's optimiser options on the validation split, write the Pareto front and a tuned
preset. The test split is never loaded: every run here is a validation-split run (:mod:`tasks.tune_config`).

1. screen: one ordinary run per candidate (clean + the cheap ``screen_attack``), so a killed search re-run skips
   the candidates (shards) already done, and the adversarial images of the screen attack are generated once and
   shared by every candidate (they do not depend on the defense);
2. the Pareto front over (clean, robust) of the screen, and the feasible candidates ranked (:mod:`tasks.tune_front`);
3. confirm: the ``confirm_top`` best feasible candidates and the baseline, each one run with clean + the strong
   adaptive ``confirm_attacks`` and the per-image worst case over them;
4. the choice (max confirmed robust metric with clean >= baseline clean - tolerance), written atomically under
   ``RESULTS_DIR/tune/<name>/``: ``front.parquet``, ``front.png``, ``<preset>.yaml`` and ``tune.json`` (the rule,
   the choice and what the search cost).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equicore.errors import EquirobustError
from storage import results as R
from storage.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from tasks.config import TASK_METRICS, RunConfig
from tasks.tune_config import Candidate, TuneSpec
from tasks.tune_front import choose, feasible, pareto_front, rank, tolerance_units

WORST = "worst"


class TuneRunFailed(EquirobustError):
    """A candidate run ended with failed shards (the search stops; everything finished is kept)."""


@dataclass
class Cost:
    runs: int = 0
    shards_computed: int = 0
    shards_skipped: int = 0
    image_passes: float = 0.0  # computed by this invocation (flows.dry_run's count; an upper bound)
    seconds: float = 0.0
    run_ids: list[str] = field(default_factory=list)


@dataclass
class TuneResult:
    out_dir: Path
    chosen: Candidate
    rows: list[dict[str, Any]]
    preset_path: Path
    front_path: Path
    plot_path: Path
    cost: Cost


Runner = Callable[[RunConfig], Any]


def _run(cfg: RunConfig, cost: Cost, runner: Runner | None) -> None:
    from flows.dry_run import dry_run
    from flows.pipeline import run

    cost.image_passes += float(dry_run(cfg, estimate_seconds=False)["passes_to_compute"])
    summary = (runner or run)(cfg)
    if summary.failed:
        raise TuneRunFailed(
            f"run {summary.run_id}: {len(summary.failed)} shard(s) failed ({summary.failed[0]['error']}); see "
            f"`equi status {summary.run_id}`, fix the cause and run `equi tune` again: finished candidates are kept"
        )
    cost.runs += 1
    cost.shards_computed += summary.computed
    cost.shards_skipped += summary.skipped
    cost.run_ids.append(summary.run_id)


def _cell(cfg: RunConfig, metric: str, worst: bool) -> dict[str, Any]:
    """(clean, robust) with intervals from a finished run's results table."""
    rows = [r for r in R.read_results_table(cfg.results_dir, cfg.run_id()).to_pylist() if r["metric"] == metric]
    clean = next(r for r in rows if r["attack_index"] == 0 and r["attack"] != WORST)
    robust = [r for r in rows if r["attack"] == WORST] if worst else []
    if not robust:  # no per-image worst row: the weakest attack row
        robust = sorted((r for r in rows if r["attack_index"] >= 1 and r["attack"] != WORST), key=lambda r: r["value"])
    rob = robust[0]
    return {
        "clean": clean["value"],
        "clean_ci_low": clean.get("ci_low"),
        "clean_ci_high": clean.get("ci_high"),
        "robust": rob["value"],
        "robust_ci_low": rob.get("ci_low"),
        "robust_ci_high": rob.get("ci_high"),
        "n_samples": clean["n_samples"],
    }


@contextlib.contextmanager
def shared_runner(spec: TuneSpec) -> Iterator[Runner | None]:
    """How the candidate runs execute: in this process as the config says, or on ONE local Dask cluster and ONE
    Prefect API for every candidate (as ``equi demo`` does; starting them per candidate would cost more than a small
    run). The cluster settings are not part of a run id, so either way the runs resume each other."""
    cluster = spec.base_config.cluster
    if cluster.in_process or cluster.address:
        yield None
        return
    from flows.execution import local_cluster
    from flows.pipeline import run
    from flows.prefect_api import prefect_api

    with local_cluster(cluster.n_workers) as (address, threads, gpus), prefect_api():

        def runner(cfg: RunConfig) -> Any:
            data = cfg.model_dump(mode="json")
            local = {"n_workers": None, "dashboard": False, "host": "127.0.0.1"}
            data["cluster"].update(address=address, torch_threads=threads, gpu_resources=gpus, **local)
            return run(RunConfig.model_validate(data))

        yield runner


def tune(spec: TuneSpec, *, runner: Runner | None = None, log: Callable[[str], None] = print) -> TuneResult:
    """Run the search of ``spec`` (resumable) and write its outputs; see the module docstring."""
    if runner is None:
        with shared_runner(spec) as shared:
            return _tune(spec, shared, log)
    return _tune(spec, runner, log)


def _tune(spec: TuneSpec, runner: Runner | None, log: Callable[[str], None]) -> TuneResult:
    started = time.perf_counter()
    cost = Cost()
    metric = TASK_METRICS[_task(spec)]
    search = spec.search
    n = len(spec.candidates)
    log(
        f"tune {spec.name}: {n} candidates (candidate 0 = the defense as configured) on the {spec.validation_split!r} "
        f"split, {search.validation.limit or 'all'} images; screen attack {search.screen_attack.get('name')}"
    )
    rows: list[dict[str, Any]] = []
    for c in spec.candidates:
        cfg = spec.screen_config(c)
        _run(cfg, cost, runner)
        cell = _cell(cfg, metric, worst=False)
        rows.append(
            {
                "candidate": c.number,
                "label": c.label,
                "settings": json.dumps(c.settings, sort_keys=True),
                "defense": json.dumps(c.defense, sort_keys=True),
                "baseline": c.number == 0,
                "metric": metric,
                "split": spec.validation_split,
                "n_samples": cell["n_samples"],
                "clean": cell["clean"],
                "clean_ci_low": cell["clean_ci_low"],
                "clean_ci_high": cell["clean_ci_high"],
                "robust_screen": cell["robust"],
                "robust_screen_ci_low": cell["robust_ci_low"],
                "robust_screen_ci_high": cell["robust_ci_high"],
                "screen_run_id": cfg.run_id(),
            }
        )
        log(f"  screened {c.number}/{n - 1} {c.label}: clean {cell['clean']:.4f}, robust {cell['robust']:.4f}")
    front = pareto_front([(r["clean"], r["robust_screen"]) for r in rows])
    tol = tolerance_units(metric, search.clean_tolerance)
    for r, on in zip(rows, front, strict=True):
        r["on_front"] = on
        r["feasible"] = feasible(r["clean"], rows[0]["clean"], tol)
        r.update(robust_confirmed=None, robust_confirmed_ci_low=None, robust_confirmed_ci_high=None)
        r["confirm_run_id"] = None
    confirm = rank(rows)[: search.confirm_top]
    if search.confirm_top and 0 not in confirm:
        confirm.append(0)  # the baseline is always confirmed: the chosen setting must beat it under the strong attacks
    for number in confirm:
        c = spec.candidates[number]
        cfg = spec.confirm_config(c)
        _run(cfg, cost, runner)
        cell = _cell(cfg, metric, worst=True)
        rows[number].update(
            robust_confirmed=cell["robust"],
            robust_confirmed_ci_low=cell["robust_ci_low"],
            robust_confirmed_ci_high=cell["robust_ci_high"],
            confirm_run_id=cfg.run_id(),
        )
        log(f"  confirmed {c.number} {c.label}: robust {cell['robust']:.4f} (per-image worst of the strong attacks)")
    chosen_number = choose(rows, "robust_confirmed" if search.confirm_top else "robust_screen")
    for r in rows:
        r["chosen"] = r["candidate"] == chosen_number
    chosen = spec.candidates[chosen_number]
    cost.seconds = time.perf_counter() - started
    return _write(spec, rows, chosen, cost, metric)


def _task(spec: TuneSpec) -> str:
    from equicore.registry import MODELS

    return str(MODELS.meta(spec.base_config.model.name).get("task") or "classification")


def _write(spec: TuneSpec, rows: list[dict[str, Any]], chosen: Candidate, cost: Cost, metric: str) -> TuneResult:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from reports.figures import pareto_plot

    out = spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    front_path = atomic_write_bytes(out / "front.parquet", buf.getvalue())
    plot_path = atomic_write_bytes(out / "front.png", pareto_plot(rows, metric=metric, title=f"{spec.name}: tuning"))
    preset = spec.preset(chosen)
    header = (
        f"# Tuned by `equi tune {spec.source}` on the {spec.validation_split!r} split (never the test split).\n"
        f"# Chosen: candidate {chosen.number} ({chosen.label}). Evaluate it ONCE on test: equi run <this file>\n"
    )
    preset_path = atomic_write_text(out / f"{spec.preset_name}.yaml", header + yaml.safe_dump(preset, sort_keys=False))
    atomic_write_json(
        out / "tune.json",
        {
            "name": spec.name,
            "validation_split": spec.validation_split,
            "metric": metric,
            "rule": (
                f"max {'confirmed' if spec.search.confirm_top else 'screen'} robust {metric} subject to clean {metric} "
                f">= baseline clean - {spec.search.clean_tolerance} points"
            ),
            "chosen": {"candidate": chosen.number, "label": chosen.label, "defense": chosen.defense},
            "preset": str(preset_path),
            "cost": cost.__dict__,
        },
    )
    return TuneResult(out, chosen, rows, preset_path, front_path, plot_path, cost)
