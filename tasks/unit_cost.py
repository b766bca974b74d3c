"""What a planned unit costs, in *image passes* (one forward and backward pass of the model on one image or one view
of it), and the order a cluster should run units in.

The cost is an upper bound from the declared budgets (attack steps x restarts x targets x EOT draws, Square's query
budget, defense steps x views, the measure's views): APGD restarts and Square stop early on images already fooled.
``equi run --dry-run`` reports it (:mod:`flows.dry_run`); the Prefect flow submits units by it
(:func:`submission_priorities`), so that the longest work starts first and short units fill the end of the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.config import RunConfig
from tasks.units import AttackSpec, AttackUnit, DefendUnit, UnitSpec


def view_count(defense: Any) -> int:
    """The views a defense transforms each image by (1 for a defense without views)."""
    views = getattr(defense, "views", None)
    if views is None:
        return 1
    from equicore.transforms import build_views

    return len(build_views(views))


def defense_passes(defense: Any) -> float:
    """Image passes of one purification of one image: steps (and any extra evaluations of the objective) x (the
    image + its views); 1 for a single forward."""
    if defense is None or not getattr(defense, "optimizes_at_test_time", False):
        return 1.0
    per_step = 4 if getattr(defense, "kind", "") == "rotation" else view_count(defense) + 1
    # Early stopping / best-iterate return may evaluate the objective again (an upper bound: stops are not counted).
    evaluations = getattr(defense, "objective_evaluations", None)
    return float((evaluations() if evaluations is not None else defense.steps) * per_step)


def attack_passes(spec: AttackSpec) -> float:
    """Image passes of one attack of one image (an upper bound: early stops are not counted)."""
    from equicore.attacks import build_attack

    attack = build_attack(spec.attack.name, **spec.attack.params())
    if attack.optimizer == "square":
        return float(attack.n_queries)  # forward passes only
    targets = attack.n_target_classes if attack.target == "top" else 1
    per_step = 1.0 + (defense_passes(spec.target_defense) if attack.defense_aware else 0.0)
    return float(attack.steps * attack.n_restarts * targets * attack.eot) * per_step


def measure_passes(cfg: RunConfig) -> float:
    """Passes of one equivariance measure of one image (the image and each of its views)."""
    if not cfg.measure.enabled:
        return 0.0
    from equicore.transforms import build_views

    return float(len(build_views(cfg.measure.views)) + 1)


def pair_passes(pair: UnitSpec, measure: float, measures_before: bool = True) -> float:
    """Image passes of one image of an (attack, defense) pair: its draws of the defense, the measure of its input
    ("before", unless an earlier pair of the same images already made it) and of its output ("after"; vanilla's
    "after" is its "before")."""
    after = 0.0 if pair.defense.name == "vanilla" else measure
    return defense_passes(pair.defense_spec) * pair.eval_draws + (measure if measures_before else 0.0) + after


def submission_priorities(
    attack_units: Sequence[AttackUnit], defend_units: Sequence[DefendUnit], shard_sizes: Sequence[int], measure: float
) -> dict[AttackUnit | DefendUnit, int]:
    """Dask priorities (higher runs first) that start the longest chain of work first: a unit ranks by its own
    passes plus, for an attack shard, the largest of the defense shards waiting for it (the critical path, as list
    schedulers do). With the plan's order, short units (vanilla, clean images) would often run last while one
    worker finishes a long defense alone; ranked, they fill the end of the run. Ties keep the plan's order.

    The order changes no number: every unit's result depends only on its own inputs and seeds."""
    pair_cost = {spec: pair_passes(spec, measure) for spec in {u.spec for u in defend_units}}  # per image
    attack_cost = {spec: attack_passes(spec) for spec in {u.spec for u in attack_units}}
    rank: dict[AttackUnit | DefendUnit, float] = {}
    waiting: dict[AttackUnit, float] = {}  # per attack shard, the longest defense shard waiting for it
    for unit in defend_units:
        rank[unit] = pair_cost[unit.spec] * shard_sizes[unit.shard]
        if (upstream := unit.upstream) is not None:
            waiting[upstream] = max(waiting.get(upstream, 0.0), rank[unit])
    for unit in attack_units:
        rank[unit] = attack_cost[unit.spec] * shard_sizes[unit.shard] + waiting.get(unit, 0.0)
    plan_order = [*attack_units, *defend_units]
    ordered = sorted(range(len(plan_order)), key=lambda i: (-rank[plan_order[i]], i))
    return {plan_order[i]: len(ordered) - position for position, i in enumerate(ordered)}
