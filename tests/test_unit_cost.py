"""What a planned unit costs (tasks.unit_cost) and the priorities the flow gives Dask by it (issue #18): the longest
chain of work starts first, short units fill the end, and the scheduler really receives them."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import pipeline
from flows.planning import plan_work
from storage.cache import AdversarialCache
from storage.run_store import RunStore
from tasks.config import parse_config
from tasks.runtime import build_runtime
from tasks.unit_cost import attack_passes, measure_passes, pair_passes, submission_priorities
from tasks.units import AttackUnit, DefendUnit, plan_units
from tests.pipeline_helpers import table_rows, tiny_config


def planned(tmp_path: Path, **over):
    """The tiny pipeline config (20 digits) in shards of 8, 8 and 4: its plan, shard sizes and measure passes."""
    cfg = parse_config(tiny_config(tmp_path, shard_size=8, batch_size=4, **over))
    rt = build_runtime(cfg)
    units = plan_units(rt)
    plan = plan_work(units, RunStore(cfg.results_dir, cfg.run_id()), AdversarialCache(cfg.cache_dir))
    return plan, rt.shard_sizes(), measure_passes(cfg)


def test_costs_follow_the_declared_budgets(tmp_path: Path) -> None:
    plan, sizes, measure = planned(tmp_path)
    assert sizes == [8, 8, 4] and measure == 2.0  # measure views: hflip, plus the image
    (pgd,) = {u.spec for u in plan.attack_units}
    assert attack_passes(pgd) == 3.0  # 3 steps, 1 restart, no EOT
    by_defense = {u.spec.defense.name: u.spec for u in plan.defend_units}
    # vanilla: one forward and the "before" measure (its "after" is its "before")
    assert pair_passes(by_defense["vanilla"], measure) == 1.0 + 2.0
    # equivariance: 2 steps x (the image + 2 views) per evaluation draw (4: it is randomised), the measure before
    # and after
    assert by_defense["equivariance"].eval_draws == 4
    assert pair_passes(by_defense["equivariance"], measure) == 4 * 2 * 3 + 2.0 + 2.0
    assert pair_passes(by_defense["equivariance"], measure, measures_before=False) == 4 * 2 * 3 + 2.0


def test_priorities_start_the_longest_chain_first_and_keep_the_plan_order_on_ties(tmp_path: Path) -> None:
    plan, sizes, measure = planned(tmp_path)
    prio = submission_priorities(plan.attack_units, plan.defend_units, sizes, measure)
    units = [*plan.attack_units, *plan.defend_units]
    assert sorted(prio.values()) == list(range(1, len(units) + 1))  # one distinct priority per unit
    for unit in plan.defend_units:  # an attack shard outranks every defense shard that waits for it
        if unit.upstream is not None:
            assert prio[unit.upstream] > prio[unit]

    def defend(name: str, attack: str, shard: int) -> DefendUnit:
        (u,) = [
            u for u in plan.defend_units if (u.spec.defense.name, u.spec.attack.name, u.shard) == (name, attack, shard)
        ]
        return u

    # More passes first: equivariance before vanilla, a shard of 8 before a shard of 4 of the same pair.
    assert min(prio[u] for u in plan.defend_units if u.spec.defense.name == "equivariance") > max(
        prio[u] for u in plan.defend_units if u.spec.defense.name == "vanilla"
    )
    assert prio[defend("equivariance", "clean", 0)] > prio[defend("equivariance", "clean", 2)]
    # Equal cost: the plan's order (clean before pgd, shard 0 before shard 1).
    assert prio[defend("equivariance", "clean", 0)] > prio[defend("equivariance", "pgd", 0)]
    assert prio[defend("vanilla", "clean", 0)] > prio[defend("vanilla", "clean", 1)]
    # An attack shard ranks by its own passes plus the longest defense shard waiting for it.
    a0 = next(u for u in plan.attack_units if u.shard == 0)
    a2 = next(u for u in plan.attack_units if u.shard == 2)
    assert prio[a0] == len(units) and prio[a2] < prio[defend("equivariance", "clean", 1)]
    assert isinstance(a0, AttackUnit)


def test_priorities_of_a_partly_done_plan_cover_only_what_is_left(tmp_path: Path) -> None:
    plan, sizes, measure = planned(tmp_path)
    left = [u for u in plan.defend_units if u.shard != 1]
    prio = submission_priorities([], left, sizes, measure)
    assert set(prio) == set(left) and sorted(prio.values()) == list(range(1, len(left) + 1))
    assert plan.prioritised(sizes, measure).priorities == submission_priorities(
        plan.attack_units, plan.defend_units, sizes, measure
    )
    assert plan.model_dump() == plan.prioritised(sizes, measure).model_dump()  # the API records counts only


class PriorityRecorder:
    """A scheduler plugin that records the priority of every task as the scheduler hands it to a worker."""

    name = "equi-priority-recorder"

    def __init__(self) -> None:
        self.started: list[tuple[str, tuple]] = []
        self.scheduler = None

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish == "processing" and self.scheduler is not None:
            self.started.append((str(key), self.scheduler.tasks[key].priority))


@pytest.mark.pipeline
@pytest.mark.slow
def test_the_scheduler_receives_each_units_priority_and_the_table_is_unchanged(
    tmp_path: Path, pipeline_reference, no_configured_api
) -> None:
    from distributed import LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    recorder = type("Recorder", (PriorityRecorder, SchedulerPlugin), {})()
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://", host="127.0.0.1", dashboard_address=None
    ) as cluster:
        cluster.scheduler.add_plugin(recorder)
        recorder.scheduler = cluster.scheduler
        cfg = parse_config(tiny_config(tmp_path, cluster={"address": cluster.scheduler_address, "torch_threads": 1}))
        summary = pipeline.run(cfg)
    assert summary.ok and summary.computed == 16
    assert table_rows(cfg.results_dir, cfg.run_id()) == pipeline_reference
    # 4 attack shards and 16 defense shards, each with its own user priority (Dask stores it negated, first).
    user = sorted(-p[0] for _key, p in recorder.started)
    assert user == list(range(1, 21))
