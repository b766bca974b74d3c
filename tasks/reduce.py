"""The reduce step: every finished shard's metric states merged per (attack, defense) into the long results table
(replaced whole on every reduce), with the verdicts of :mod:`tasks.verdicts` (intervals, all-draws and per-image
worst rows, paired deltas), the worst case of AA lambda_e sweeps and the gradient-masking flags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from equicore.attacks import build_attack
from equicore.metrics import merge_all, state_from_dict
from storage.run_store import RunStore
from tasks import verdicts as V
from tasks.config import CLEAN, TASK_METRICS, AttackConfig, RunConfig
from tasks.faults import maybe_fail
from tasks.runtime import Runtime
from tasks.units import RunUnits, UnitSpec


@dataclass
class UnitResult:
    rows: list[dict[str, Any]]  # results rows
    done: int  # shards done
    merged: dict[str, list]  # metric name -> merged state per evaluation draw
    samples: list[dict[str, Any]]  # the shards' per-sample rows


def _unit_rows(rt: Runtime, store: RunStore, unit: UnitSpec, n_shards: int, provenance: dict[str, Any]) -> UnitResult:
    """The results rows of one (attack, defense) unit from its shards' merged metric states (mean over evaluation
    draws, with the between-draw spread), with what the verdicts need from the same files."""
    cfg = rt.cfg
    attack, defense = unit.attack, unit.defense
    a_key, d_key = unit.attack_key, unit.defense_key
    states: dict[str, list] = {}
    sample_rows: list[dict[str, Any]] = []
    seconds, done = 0.0, 0
    for shard in range(n_shards):
        if not store.shard_done(a_key, d_key, shard):
            continue
        table, state = store.read_shard(a_key, d_key, shard)  # once: the merged states and the verdicts' rows
        sample_rows += table.to_pylist()
        seconds += float(store.read_shard_unit(a_key, d_key, shard).get("seconds", 0.0))
        done += 1
        for name, st in state.items():
            states.setdefault(name, []).append(state_from_dict(st))
    if not done:
        return UnitResult([], 0, {}, [])
    by_base: dict[str, list] = {}
    for name in states:  # draw 0 first: "miou", then "miou#draw1", ...
        by_base.setdefault(name.split("#draw")[0], []).append(merge_all(states[name]))
    defense_params = {**unit.defense_params, "eval_draws": unit.eval_draws}
    rows = []
    for name, merged_draws in by_base.items():
        computed = [m.compute() for m in merged_draws]
        for metric in computed[0]:
            values = [float(c[metric]) for c in computed]
            label = metric.replace("equivariance_score", name) if name.startswith("equivariance") else metric
            rows.append(
                {
                    **provenance,
                    "run_id": store.run_id,
                    "dataset": cfg.dataset.name,
                    "model": cfg.model.label,
                    "attack": attack.name,
                    "attack_params": attack.params(),
                    "defense": defense.name,
                    "defense_params": defense_params,
                    "metric": label,
                    "value": float(np.mean(values)),
                    "n_samples": merged_draws[0].n_samples,
                    "n_draws": len(values),
                    "draw_std": float(np.std(values)) if len(values) > 1 else 0.0,
                    "wall_time_s": seconds,
                    "shards_done": done,
                    "shards_total": n_shards,
                    "attack_key": a_key,
                    "defense_key": d_key,
                    "attack_index": unit.attack_index,
                    "defense_index": unit.defense_index,
                }
            )
    return UnitResult(rows, done, by_base, sample_rows)


def reduce_run(rt: Runtime, units: RunUnits, store: RunStore, provenance: dict[str, Any]) -> list[dict[str, Any]]:
    """Merge every completed shard's states per (attack, defense) into the long results table (replacing it), then
    add the verdicts of :mod:`tasks.verdicts` (intervals, all-draws and per-image worst rows, paired deltas)."""
    cfg = rt.cfg
    n_shards = units.n_shards
    rows: list[dict[str, Any]] = []
    samples: dict[tuple[int, int], V.UnitSamples] = {}
    complete: set[tuple[int, int]] = set()
    for number, unit in enumerate(units.pairs):  # attack-major, so number is ai * len(defenses) + di
        maybe_fail("reduce", number)
        result = _unit_rows(rt, store, unit, n_shards, provenance)
        if not result.rows:
            continue
        rows += result.rows
        loaded = V.unit_samples(result.samples, rt.task)
        if rt.task == "instance" and "mask_ap" in result.merged:
            loaded = V.instance_samples(result.merged["mask_ap"], loaded)
        cell = (unit.attack_index, unit.defense_index)
        samples[cell] = loaded
        if result.done == n_shards:
            complete.add(cell)
    rows += sweep_worst_rows(cfg, rows)
    rows += all_draws_rows(rt, rows, samples)
    rows += per_image_worst_rows(rt, rows, samples, complete)
    add_verdicts(rt, rows, samples)
    annotate_gradient_masking(rt, units, rows)
    store.write_results_table(rows)
    return rows


def all_draws_rows(rt: Runtime, rows: list[dict[str, Any]], samples) -> list[dict[str, Any]]:
    """``<metric>_all_draws`` for units scored under several draws: an image counts only under its worst draw."""
    main = TASK_METRICS[rt.task]
    out = []
    for r in rows:
        if r["metric"] != main or r.get("n_draws", 1) < 2 or (r["attack_index"], r["defense_index"]) not in samples:
            continue
        s = samples[(r["attack_index"], r["defense_index"])]
        metric = f"{main}_all_draws"
        value = V.point_value(metric, s)
        if not math.isnan(value):
            out.append({**r, "metric": metric, "value": value, "draw_std": 0.0})
    return out


def per_image_worst_rows(rt: Runtime, rows: list[dict[str, Any]], samples, complete) -> list[dict[str, Any]]:
    """Attack ``worst`` per defense entry when the run asks for it: built per image from the cached per-attack
    outputs (see :func:`tasks.verdicts.per_image_worst`), only when every attack of that defense is complete."""
    cfg = rt.cfg
    if not cfg.worst_case:
        return []
    main = TASK_METRICS[rt.task]
    out = []
    for di in range(len(cfg.defenses)):
        cells = [(ai, di) for ai in range(len(cfg.attacks))]
        if not all(c in complete and c in samples for c in cells):
            continue
        worst = V.per_image_worst([samples[c] for c in cells])
        if worst is None:
            continue
        samples[(-1, di)] = worst
        template = next(r for r in rows if r["defense_index"] == di and r["metric"] == main)
        out.append(
            {
                **template,
                "attack": V.WORST,
                "attack_params": {"over": [a.name for a in cfg.attacks], "per": "image"},
                "metric": main,
                "value": V.point_value(main, worst),
                # Over every evaluation draw of every attack: as many draws as the defense was scored under.
                "n_draws": max(int(r.get("n_draws", 1)) for r in rows if r["defense_index"] == di),
                "draw_std": 0.0,
                "wall_time_s": sum(r["wall_time_s"] for r in rows if r["defense_index"] == di and r["metric"] == main),
                "attack_key": "worst:" + "+".join(sorted({r["attack_key"] for r in rows if r["defense_index"] == di})),
                "attack_index": -1,
            }
        )
    return out


def add_verdicts(rt: Runtime, rows: list[dict[str, Any]], samples) -> None:
    """Intervals on every main cell and paired deltas to the run's first vanilla entry, in place."""
    cfg = rt.cfg
    vanilla = next((i for i, d in enumerate(cfg.defenses) if d.name == "vanilla"), None)
    for r in rows:
        s = samples.get((r["attack_index"], r["defense_index"])) if r["attack"].find(":") < 0 else None
        iv = V.interval(r["metric"], s, cfg.seed) if s is not None else None
        V.add_interval_columns(r, iv)
        delta = None
        if s is not None and vanilla is not None and r["defense_index"] != vanilla:
            base = samples.get((r["attack_index"], vanilla))
            delta = V.delta_interval(r["metric"], base, s, cfg.seed) if base is not None else None
        V.add_delta_columns(r, delta)


# Which way is worse for the defender: the attack's worst case over a sweep takes the min (or the max).
_WORSE = {"accuracy": min, "miou": min, "mask_ap": min, "miou_to_target": max}
WORST_SUFFIX = ":worst"


def sweep_worst_rows(cfg: RunConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each ``lambda_e`` sweep of the adaptive attack: the worst case over its values per (defense, metric),
    as rows of attack ``aa:worst`` naming the lambda_e that achieved it (paper: "we search the optimal lambda_e")."""
    groups: dict[str, list[AttackConfig]] = {}
    for a in cfg.attacks:
        if (g := a.sweep_group()) is not None:
            groups.setdefault(g, []).append(a)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        lambdas = sorted(float(a.params().get("lambda_e", 1.0)) for a in members)
        member_params = [a.params() for a in members]
        by_cell: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for r in rows:
            if r["attack_params"] in member_params and r["metric"] in _WORSE:
                by_cell.setdefault((r["defense"], r["defense_key"], r["metric"]), []).append(r)
        for (_, _, metric), cell in by_cell.items():
            if len(cell) < len(members):
                continue  # a sweep value is missing (failed shards): no worst case claimed
            worst = _WORSE[metric](cell, key=lambda r: r["value"])
            params = {k: v for k, v in worst["attack_params"].items() if k != "lambda_e"}
            out.append(
                {
                    **worst,
                    "attack": worst["attack"] + WORST_SUFFIX,
                    "attack_params": {
                        **params,
                        "lambda_e_sweep": lambdas,
                        "worst_lambda_e": worst["attack_params"].get("lambda_e", 1.0),
                    },
                    "shards_done": min(r["shards_done"] for r in cell),
                    "wall_time_s": sum(r["wall_time_s"] for r in cell),
                    "attack_key": "+".join(sorted({r["attack_key"] for r in cell})),
                }
            )
    return out


def masking_flags(rt: Runtime, units: RunUnits) -> list[dict[str, Any]]:
    """Per defense entry (config order): its declared properties and the gradient-masking warning, if any. A
    test-time-optimising or randomised defense must be evaluated with BPDA (with EOT when randomised) and with the
    defense-aware attack AA; each entry is judged on its own, so two entries of one name never share a verdict."""
    adaptive = [build_attack(a.name, **a.params()) for a in rt.cfg.attacks if a.defense_aware]
    flags = []
    for d, spec in zip(rt.cfg.defenses, units.reference_defenses, strict=True):
        test_time, randomized = bool(spec.optimizes_at_test_time), bool(spec.randomized)
        # BPDA without EOT (eot < 2) does not count as BPDA against a randomised defense.
        done = {"bpda-no-eot" if randomized and a.adaptive == "bpda" and a.eot < 2 else a.adaptive for a in adaptive}
        missing = []
        if test_time or randomized:
            if "bpda" not in done:
                missing.append("BPDA with EOT" if randomized and "bpda-no-eot" in done else "BPDA")
            if test_time and "aa" not in done:
                missing.append("AA")
        warning = (
            f"{d.name} is a {'test-time' if test_time else 'randomised'} defense not evaluated with "
            + " or ".join(missing)
            + ": its robust numbers may reflect gradient masking"
            if missing
            else ""
        )
        flags.append({"defense_test_time": test_time, "defense_randomized": randomized, "masking_warning": warning})
    return flags


def annotate_gradient_masking(rt: Runtime, units: RunUnits, rows: list[dict[str, Any]]) -> None:
    """AutoAttack-style flags on every row (see :func:`masking_flags`), matched to its defense entry by key."""
    flags = masking_flags(rt, units)
    square = {
        ai
        for ai, a in enumerate(rt.cfg.attacks)
        if a.name != CLEAN and build_attack(a.name, **a.params()).gradient_free
    }
    suspected = V.square_masking(rows, square, TASK_METRICS[rt.task])
    for di, text in suspected.items():
        warning = flags[di]["masking_warning"]
        flags[di] = {**flags[di], "masking_warning": f"{warning}; {text}" if warning else text}
    entry_of = {unit.defense_key: unit.defense_index for unit in units.pairs}
    aware = {a.name for a in rt.cfg.attacks if a.defense_aware}
    for r in rows:
        r.update(flags[entry_of[r["defense_key"]]])
        r["attack_defense_aware"] = r["attack"].split(":")[0] in aware
