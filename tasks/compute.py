"""Shard-level steps as plain functions (the Prefect tasks and the in-process runner both call these).

attack_shard: adversarial images for one (attack, shard) -> Zarr cache, keyed by content.
defend_shard: purify + predict + score one (attack, defense, shard) -> one Parquet file with per-sample rows and
              the shard's mergeable metric states.
reduce_run:   merge shard states per (attack, defense) -> the long results table.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from equicore.attacks import build_attack, make_targets, run_attack
from equicore.defenses import build_defense
from equicore.equivariance import consistency_score, sample_view_params
from equicore.metrics import build_metric, merge_all, per_image_iou, state_from_dict
from equicore.metrics.functional import confusion_matrix
from equicore.seeding import derive_seed, sample_seeds
from equicore.transforms import build_views
from equicore.validation import check_images
from storage import results as R
from storage.cache import AdversarialCache
from storage.errors import CacheCorruptError
from storage.examples import write_examples
from storage.keys import canonical_json, content_key
from tasks import verdicts as V
from tasks.config import CLEAN, TASK_METRICS, AttackConfig, DefenseConfig, RunConfig
from tasks.examples import ExampleMaker, example_slots
from tasks.faults import maybe_fail
from tasks.runtime import Runtime, code_version, plan_shards, to_numpy_images

CLEAN_ATTACK = AttackConfig(name=CLEAN)  # resolves a defense's budgets without an attack (reference eps)


# ---------------------------------------------------------------------------------------------------- identities
def attack_identity(rt: Runtime, attack: AttackConfig, defense: DefenseConfig | None = None) -> dict[str, Any]:
    """Everything the adversarial images depend on (the cache key is its hash + the code version); for a
    defense-aware attack (BPDA, AA) that includes the defense with its resolved budgets."""
    params = build_attack(attack.name, **attack.params()).params() if attack.name != CLEAN else {}
    ident: dict[str, Any] = {
        "dataset": rt.dataset_fingerprint,
        "indices": content_key(rt.indices, ""),
        "shard_size": rt.cfg.shard_size,
        "model": {
            "name": rt.cfg.model.name,
            "weights": rt.model_digest,
            "params": rt.cfg.model.params,
            "adapter": rt.cfg.model.adapter,
        },
        "attack": {"name": attack.name, **params},
        "seed": rt.cfg.seed,
    }
    if attack.defense_aware:
        if defense is None:
            raise ValueError(f"attack {attack.name!r} is defense-aware: its identity needs the defense")
        ident["defense"] = resolved_defense(rt, attack, defense).params()
    return ident


def attack_key(rt: Runtime, attack: AttackConfig, defense: DefenseConfig | None = None) -> str:
    """Content key of the attack's images. ``defense`` is used only by defense-aware attacks."""
    if attack.name == CLEAN:
        return CLEAN
    return content_key(attack_identity(rt, attack, defense), code_version())


def attack_defense_index(cfg: RunConfig, attack_index: int, defense_index: int) -> int:
    """The defense an attack unit is generated against: ``defense_index`` for BPDA/AA, -1 (none) otherwise."""
    return defense_index if cfg.attacks[attack_index].defense_aware else -1


def attack_defense(cfg: RunConfig, defense_index: int) -> DefenseConfig | None:
    return cfg.defenses[defense_index] if defense_index >= 0 else None


def resolved_defense(rt: Runtime, attack: AttackConfig, defense: DefenseConfig):
    """The defense with its budgets resolved from the attack's eps (and, for head-based defenses, the run's model)."""
    eps = attack.eps if attack.name != CLEAN else rt.cfg.resolved_reference_eps()
    spec = build_defense(defense.name, **defense.params()).with_attack_eps(eps)
    if getattr(spec, "head", "") is None and hasattr(spec, "for_model"):
        spec = dataclasses.replace(spec, for_model=rt.cfg.model.name)
    return spec


def preflight_defenses(rt: Runtime) -> None:
    """Load what every defense needs (e.g. a self-supervised head) now, so a missing or mismatched artefact fails
    the run before anything is written instead of failing every shard on the workers."""
    for defense in rt.cfg.defenses:
        prepare = getattr(resolved_defense(rt, CLEAN_ATTACK, defense), "prepare", None)
        if callable(prepare):
            prepare(rt.adapter)


def eval_draws(rt: Runtime, attack: AttackConfig, defense: DefenseConfig) -> int:
    """How many independent draws of the defense's randomness each image is scored under."""
    return defense.resolved_eval_draws(bool(resolved_defense(rt, attack, defense).randomized))


def defense_key(rt: Runtime, attack: AttackConfig, defense: DefenseConfig) -> str:
    ident = {"defense": resolved_defense(rt, attack, defense).params(), "measure": rt.cfg.measure.model_dump()}
    draws = eval_draws(rt, attack, defense)
    if draws > 1:  # one draw keeps the key it had before draws existed
        ident["eval_draws"] = draws
    return content_key(ident, code_version())


def draw_seeds(seeds: list[int], draw: int) -> list[int]:
    """Seeds of evaluation draw ``draw``: draw 0 is the defense's own stream; the others derive from it, and none
    shares a purpose with an attacker's EOT draws (``bpda`` streams hang off the attack's seeds)."""
    return seeds if draw == 0 else [derive_seed(s, "eval-draw", draw) for s in seeds]


def draw_state_name(name: str, draw: int) -> str:
    return name if draw == 0 else f"{name}#draw{draw}"


def unit_key(attack_k: str, defense_k: str | None = None) -> str:
    return f"{attack_k}.{defense_k}" if defense_k else attack_k


# ---------------------------------------------------------------------------------------------------- helpers
@dataclass
class ShardData:
    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]


def load_shard(rt: Runtime, shard: int) -> ShardData:
    indices = plan_shards(rt.indices, rt.cfg.shard_size)[shard]
    images, labels, ids = rt.batch(indices)
    check_images(images, f"dataset {rt.cfg.dataset.name} shard {shard}")
    return ShardData(images, labels, ids)


def _batches(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


def seeds_for(rt: Runtime, ids: list[str], purpose: str) -> list[int]:
    return [derive_seed(s, purpose) for s in sample_seeds(rt.cfg.seed, ids)]


# ---------------------------------------------------------------------------------------------------- attack
def attack_shard(
    rt: Runtime, cache: AdversarialCache, attack: AttackConfig, shard: int, defense: DefenseConfig | None = None
) -> dict[str, Any]:
    """Compute and cache one shard's adversarial images unless a verified entry exists. ``defense``: the defense a
    defense-aware attack (BPDA, AA) attacks; ignored by the others."""
    key = attack_key(rt, attack, defense)
    if cache.has(key, shard):
        return {"status": "cached", "key": key, "shard": shard, "seconds": 0.0}
    maybe_fail("attack", shard)
    t0 = time.perf_counter()
    data = load_shard(rt, shard)
    spec = build_attack(attack.name, **attack.params())
    # Seeds depend on the attack and the sample only (not on shard size or position), so any sharding agrees.
    seeds = seeds_for(rt, data.ids, "attack:" + canonical_json(spec.params()))
    target = resolved_defense(rt, attack, defense) if attack.defense_aware and defense is not None else None
    out = []
    for sl in _batches(len(data.ids), rt.cfg.batch_size):
        result = run_attack(spec, rt.adapter, data.images[sl], data.labels[sl], seeds[sl], defense=target)
        out.append(result.x_adv)
    x_adv = torch.cat(out)
    meta = {"identity": attack_identity(rt, attack, defense), "code_version": code_version()}
    maybe_fail("attack-computed", shard)
    cache.write(key, shard, to_numpy_images(x_adv), data.ids, meta)
    return {"status": "computed", "key": key, "shard": shard, "seconds": time.perf_counter() - t0}


def adversarial_images(
    rt: Runtime,
    cache: AdversarialCache,
    attack: AttackConfig,
    shard: int,
    data: ShardData,
    defense: DefenseConfig | None = None,
):
    if attack.name == CLEAN:
        return data.images
    key = attack_key(rt, attack, defense)
    try:
        array, ids = cache.read(key, shard)
    except CacheCorruptError:
        cache.invalidate(key, shard)  # regenerated by the attack step on resume/retry
        raise
    if ids != data.ids:
        raise CacheCorruptError(
            f"cache {key} shard {shard} holds samples {ids[:3]}... but the plan has {data.ids[:3]}...",
            key=key,
            shard=shard,
        )
    return torch.from_numpy(np.ascontiguousarray(array)).to(rt.device)


# ---------------------------------------------------------------------------------------------------- defend
def metric_names(rt: Runtime, attack: AttackConfig) -> list[str]:
    names = [TASK_METRICS[rt.task]]
    spec = build_attack(attack.name, **attack.params()) if attack.name != CLEAN else None
    if rt.task == "segmentation" and spec is not None and spec.targeted and spec.target != "top":
        names.append("miou_to_target")
    return names


def _new_state(rt: Runtime, name: str):
    if name in ("miou", "miou_to_target"):
        return build_metric(name, num_classes=rt.dataset.num_classes, ignore_index=rt.dataset.ignore_index)
    return build_metric(name)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    return [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in d.items()} for d in value]


def _summary(task: str, value: Any) -> int:
    """Per-sample summary: the class for classification, the instance count for instance segmentation."""
    if task == "classification":
        return int(value)
    if task == "instance":
        return int(len(value["labels"]))
    return -1


def _equivariance(rt: Runtime, x: torch.Tensor) -> torch.Tensor:
    m = rt.cfg.measure
    views = build_views(m.views)
    params = sample_view_params(views, derive_seed(m.seed, "measure"), tuple(x.shape[-2:]))
    with torch.no_grad():
        return consistency_score(rt.adapter.features, x, views, params).double().cpu()


def _segmentation_counts(preds: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore: int | None) -> list:
    """Per image: true-positive, predicted and ground-truth pixel counts per class (what a dataset mIoU needs)."""
    out = []
    for p, t in zip(preds, labels, strict=True):
        cm = confusion_matrix(p, t, num_classes, ignore)
        out.append([cm.diag().tolist(), cm.sum(0).tolist(), cm.sum(1).tolist()])
    return out


def defend_shard(
    rt: Runtime, cache: AdversarialCache, attack: AttackConfig, defense: DefenseConfig, shard: int, run_id: str
) -> dict[str, Any]:
    a_key, d_key = attack_key(rt, attack, defense), defense_key(rt, attack, defense)
    results_dir = rt.cfg.results_dir
    if R.shard_done(results_dir, run_id, a_key, d_key, shard):
        return {"status": "done-before", "shard": shard, "seconds": 0.0}
    maybe_fail("defend", shard)
    t0 = time.perf_counter()
    data = load_shard(rt, shard)
    x_in = adversarial_images(rt, cache, attack, shard, data, defense)
    spec = resolved_defense(rt, attack, defense)
    # Seeded from what the defense is, not from its storage key: the key carries the code version, and a refactor
    # must not redraw a randomised defense's noise (attacks are seeded the same way).
    seeds = seeds_for(rt, data.ids, "defense:" + canonical_json(spec.params()))
    draws = eval_draws(rt, attack, defense)
    names = metric_names(rt, attack)
    states = {(n, r): _new_state(rt, n) for r in range(draws) for n in names}
    equi_before, equi_after = build_metric("equivariance_score"), build_metric("equivariance_score")
    attack_spec = build_attack(attack.name, **attack.params()) if attack.name != CLEAN else None
    rows: list[dict[str, Any]] = []
    slots = example_slots(shard, rt.cfg.shard_size, rt.cfg.report.examples, len(data.ids))
    restored: list[torch.Tensor] = []  # defended images (draw 0), kept only when this shard holds examples
    for sl in _batches(len(data.ids), rt.cfg.batch_size):
        x, y = x_in[sl], data.labels[sl]
        targets = None
        if attack_spec is not None and attack_spec.targeted and attack_spec.target != "top":
            targets = make_targets(rt.adapter, data.images[sl], y, attack_spec.target).cpu()
        per_draw = []  # (x_def, batch) per draw
        for r in range(draws):
            x_def = spec.purify(rt.adapter, x, draw_seeds(seeds[sl], r))
            with torch.no_grad():
                preds = rt.adapter.predict(x_def)
            batch: dict[str, Any] = {"preds": _to_cpu(preds), "labels": _to_cpu(y)}
            if targets is not None:
                batch["attack_targets"] = targets
            for n in names:
                states[(n, r)].update(batch)
            per_draw.append((x_def, batch))
        x_def, batch = per_draw[0]
        if slots:
            restored.append(x_def.detach())
        n_batch = len(batch["preds"])
        before = after = [math.nan] * n_batch
        if rt.cfg.measure.enabled:
            b, a = _equivariance(rt, x), _equivariance(rt, x_def)
            equi_before.update({"scores": b})
            equi_after.update({"scores": a})
            before, after = b.tolist(), a.tolist()
        linf = (x_def - x).flatten(1).abs().amax(1).mul(255).tolist()
        correct_draws = [[math.nan] * n_batch for _ in range(draws)]
        iou_draws = [[math.nan] * n_batch for _ in range(draws)]
        counts_draws: list[list] = [[None] * n_batch for _ in range(draws)]
        for r, (_, bt) in enumerate(per_draw):
            if rt.task == "classification":
                correct_draws[r] = [
                    float(p == t) for p, t in zip(bt["preds"].tolist(), bt["labels"].tolist(), strict=True)
                ]
            elif rt.task == "segmentation":
                ignore = rt.dataset.ignore_index
                iou_draws[r] = per_image_iou(bt["preds"], bt["labels"], rt.dataset.num_classes, ignore)
                counts_draws[r] = _segmentation_counts(bt["preds"], bt["labels"], rt.dataset.num_classes, ignore)
        for j, sid in enumerate(data.ids[sl]):
            label, pred = _summary(rt.task, batch["labels"][j]), _summary(rt.task, batch["preds"][j])
            row = {
                "sample_id": sid,
                "attack": attack.name,
                "defense": defense.name,
                "label": label,
                "pred": pred,
                "correct": float(pred == label) if rt.task == "classification" else math.nan,
                "image_miou": float(iou_draws[0][j]),
                "equivariance_before": float(before[j]),
                "equivariance_after": float(after[j]),
                "purify_linf_255": float(linf[j]),
                # One entry per evaluation draw (draw 0 is the columns above): what the reduce step builds the
                # mean over draws, the all-draws worst, the per-image worst over attacks and the intervals from.
                "draw_correct": [float(c[j]) for c in correct_draws],
                "draw_image_miou": [float(c[j]) for c in iou_draws],
            }
            if rt.task == "segmentation":
                row["draw_class_counts"] = [c[j] for c in counts_draws]
            rows.append(row)
    state = {draw_state_name(n, r): st.to_dict() for (n, r), st in states.items()}
    if rt.cfg.measure.enabled:
        state["equivariance_before"] = equi_before.to_dict()
        state["equivariance_after"] = equi_after.to_dict()
    seconds = time.perf_counter() - t0
    unit = {
        "attack_key": a_key,
        "defense_key": d_key,
        "shard": shard,
        "attack": attack.name,
        "defense": defense.name,
        "n": len(data.ids),
        "eval_draws": draws,
        "seconds": seconds,
    }
    if slots:  # before the sample file: that file marks the shard done
        record_examples(rt, data, x_in, torch.cat(restored), slots, unit, run_id)
    maybe_fail("defend-computed", shard)
    R.write_shard(results_dir, run_id, unit, rows, state)
    return {"status": "computed", "shard": shard, "seconds": seconds}


def record_examples(
    rt: Runtime,
    data: ShardData,
    x_in: torch.Tensor,
    x_def: torch.Tensor,
    slots: list[int],
    unit: dict[str, Any],
    run_id: str,
) -> None:
    """Write the Figure-2 examples (clean / attacked / restored images and predictions) of one unit shard."""
    maker = ExampleMaker(
        rt.adapter,
        rt.task,
        rt.dataset.num_classes,
        getattr(rt.dataset, "ignore_index", None),
        rt.cfg.measure.views,
        rt.cfg.measure.seed,
    )
    rows = []
    attack, defense = unit["attack"], unit["defense"]
    for j in slots:
        y = data.labels[j]
        row = maker.row((data.images[j], x_in[j], x_def[j]), y)
        position = unit["shard"] * rt.cfg.shard_size + j  # in the run's sample order: the same under any sharding
        rows.append({**row, "position": position, "sample_id": data.ids[j], "attack": attack, "defense": defense})
    write_examples(rt.cfg.results_dir, run_id, unit, rows)


# ---------------------------------------------------------------------------------------------------- reduce
def units(cfg: RunConfig) -> list[tuple[int, int]]:
    return [(ai, di) for ai in range(len(cfg.attacks)) for di in range(len(cfg.defenses))]


def _unit_rows(rt, run_id, ai, di, n_shards, provenance) -> tuple[list[dict[str, Any]], int]:
    """The results rows of one (attack, defense) unit from its shards' merged metric states (mean over evaluation
    draws, with the between-draw spread), and how many shards were done."""
    cfg = rt.cfg
    attack, defense = cfg.attacks[ai], cfg.defenses[di]
    a_key, d_key = attack_key(rt, attack, defense), defense_key(rt, attack, defense)
    states: dict[str, list] = {}
    seconds, done = 0.0, 0
    for shard in range(n_shards):
        if not R.shard_done(cfg.results_dir, run_id, a_key, d_key, shard):
            continue
        path = R.shard_path(cfg.results_dir, run_id, a_key, d_key, shard)
        _, state = R.read_shard(path)
        seconds += float(R.read_shard_unit(path).get("seconds", 0.0))
        done += 1
        for name, st in state.items():
            states.setdefault(name, []).append(state_from_dict(st))
    if not done:
        return [], 0, {}
    by_base: dict[str, list] = {}
    for name in states:  # draw 0 first: "miou", then "miou#draw1", ...
        by_base.setdefault(name.split("#draw")[0], []).append(merge_all(states[name]))
    defense_params = {**resolved_defense(rt, attack, defense).params(), "eval_draws": eval_draws(rt, attack, defense)}
    rows = []
    for name, merged_draws in by_base.items():
        computed = [m.compute() for m in merged_draws]
        for metric in computed[0]:
            values = [float(c[metric]) for c in computed]
            label = metric.replace("equivariance_score", name) if name.startswith("equivariance") else metric
            rows.append(
                {
                    **provenance,
                    "run_id": run_id,
                    "dataset": cfg.dataset.name,
                    "model": cfg.model.name,
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
                    "attack_index": ai,
                    "defense_index": di,
                }
            )
    return rows, done, by_base


def reduce_run(rt: Runtime, run_id: str, provenance: dict[str, Any]) -> list[dict[str, Any]]:
    """Merge every completed shard's states per (attack, defense) into the long results table (replacing it), then
    add the verdicts of :mod:`tasks.verdicts` (intervals, all-draws and per-image worst rows, paired deltas)."""
    cfg = rt.cfg
    n_shards = len(plan_shards(rt.indices, cfg.shard_size))
    rows: list[dict[str, Any]] = []
    samples: dict[tuple[int, int], V.UnitSamples] = {}
    complete: set[tuple[int, int]] = set()
    for ai, di in units(cfg):
        maybe_fail("reduce", ai * len(cfg.defenses) + di)
        unit_rows, done, merged = _unit_rows(rt, run_id, ai, di, n_shards, provenance)
        if not unit_rows:
            continue
        rows += unit_rows
        a_key, d_key = unit_rows[0]["attack_key"], unit_rows[0]["defense_key"]
        loaded = V.load_unit_samples(cfg.results_dir, run_id, a_key, d_key, n_shards, rt.task)
        if rt.task == "instance" and "mask_ap" in merged:
            loaded = V.instance_samples(merged["mask_ap"], loaded)
        if loaded is not None:
            samples[(ai, di)] = loaded
        if done == n_shards:
            complete.add((ai, di))
    rows += sweep_worst_rows(cfg, rows)
    rows += all_draws_rows(rt, rows, samples)
    rows += per_image_worst_rows(rt, rows, samples, complete)
    add_verdicts(rt, rows, samples)
    annotate_gradient_masking(rt, rows)
    R.write_results_table(cfg.results_dir, run_id, rows)
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


def masking_flags(rt: Runtime) -> list[dict[str, Any]]:
    """Per defense entry (config order): its declared properties and the gradient-masking warning, if any. A
    test-time-optimising or randomised defense must be evaluated with BPDA (with EOT when randomised) and with the
    defense-aware attack AA; each entry is judged on its own, so two entries of one name never share a verdict."""
    adaptive = [build_attack(a.name, **a.params()) for a in rt.cfg.attacks if a.defense_aware]
    flags = []
    for d in rt.cfg.defenses:
        spec = resolved_defense(rt, CLEAN_ATTACK, d)
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


def annotate_gradient_masking(rt: Runtime, rows: list[dict[str, Any]]) -> None:
    """AutoAttack-style flags on every row (see :func:`masking_flags`), matched to its defense entry by key."""
    flags = masking_flags(rt)
    square = {
        ai
        for ai, a in enumerate(rt.cfg.attacks)
        if a.name != CLEAN and build_attack(a.name, **a.params()).gradient_free
    }
    suspected = V.square_masking(rows, square, TASK_METRICS[rt.task])
    for di, text in suspected.items():
        warning = flags[di]["masking_warning"]
        flags[di] = {**flags[di], "masking_warning": f"{warning}; {text}" if warning else text}
    entry_of = {defense_key(rt, a, d): di for a in rt.cfg.attacks for di, d in enumerate(rt.cfg.defenses)}
    aware = {a.name for a in rt.cfg.attacks if a.defense_aware}
    for r in rows:
        r.update(flags[entry_of[r["defense_key"]]])
        r["attack_defense_aware"] = r["attack"].split(":")[0] in aware
