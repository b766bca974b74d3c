"""The shard-level steps as plain functions (the Prefect tasks in :mod:`flows.prefect_tasks` and the in-process
runner both call these), each given a planned unit of :mod:`tasks.units`:

attack_shard: adversarial images for one :class:`~tasks.units.AttackUnit` -> Zarr cache, keyed by content.
defend_shard: purify + predict + score one :class:`~tasks.units.DefendUnit` -> one Parquet file with per-sample rows
              and the shard's mergeable metric states.

The reduce step (merged states -> the long results table, with its verdicts) is in :mod:`tasks.reduce`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from equicore.attacks import build_attack, make_targets, run_attack
from equicore.equivariance import consistency_score, sample_view_params
from equicore.metrics import build_metric
from equicore.metrics.functional import confusion_matrix, mean_iou
from equicore.seeding import derive_seed, sample_seeds
from equicore.transforms import build_views
from equicore.validation import check_images
from storage.cache import AdversarialCache
from storage.errors import CacheCorruptError
from storage.keys import canonical_json
from storage.measure_cache import MeasureCache
from storage.run_store import RunStore
from tasks.config import CLEAN, TASK_METRICS, AttackConfig
from tasks.examples import ExampleMaker, example_slots
from tasks.faults import maybe_fail
from tasks.runtime import Runtime, plan_shards, to_numpy_images
from tasks.units import AttackUnit, DefendUnit, RunUnits


# ---------------------------------------------------------------------------------------------------- checks
def preflight_defenses(rt: Runtime, units: RunUnits) -> None:
    """Load what every defense needs (e.g. a self-supervised head) now, so a missing or mismatched artefact fails
    the run before anything is written instead of failing every shard on the workers."""
    for spec in units.reference_defenses:
        prepare = getattr(spec, "prepare", None)
        if callable(prepare):
            prepare(rt.adapter)


def draw_seeds(seeds: list[int], draw: int) -> list[int]:
    """Seeds of evaluation draw ``draw``: draw 0 is the defense's own stream; the others derive from it, and none
    shares a purpose with an attacker's EOT draws (``bpda`` streams hang off the attack's seeds)."""
    return seeds if draw == 0 else [derive_seed(s, "eval-draw", draw) for s in seeds]


def draw_state_name(name: str, draw: int) -> str:
    return name if draw == 0 else f"{name}#draw{draw}"


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
def attack_shard(rt: Runtime, cache: AdversarialCache, unit: AttackUnit) -> dict[str, Any]:
    """Compute and cache one shard's adversarial images unless a verified entry exists. A defense-aware attack
    (BPDA, AA) attacks the unit's target defense, resolved at planning."""
    spec, shard = unit.spec, unit.shard
    key = spec.attack_key
    if cache.has(key, shard):
        return {"status": "cached", "key": key, "shard": shard, "seconds": 0.0}
    maybe_fail("attack", shard)
    t0 = time.perf_counter()
    data = load_shard(rt, shard)
    attack = build_attack(spec.attack.name, **spec.attack.params())
    # Seeds depend on the attack and the sample only (not on shard size or position), so any sharding agrees.
    seeds = seeds_for(rt, data.ids, "attack:" + canonical_json(attack.params()))
    target = spec.target_defense if spec.attack.defense_aware else None
    out = []
    for sl in _batches(len(data.ids), rt.cfg.batch_size):
        result = run_attack(attack, rt.adapter, data.images[sl], data.labels[sl], seeds[sl], defense=target)
        out.append(result.x_adv)
    x_adv = torch.cat(out)
    meta = {"identity": spec.identity, "code": spec.code}
    maybe_fail("attack-computed", shard)
    cache.write(key, shard, to_numpy_images(x_adv), data.ids, meta)
    return {"status": "computed", "key": key, "shard": shard, "seconds": time.perf_counter() - t0}


def adversarial_images(rt: Runtime, cache: AdversarialCache, unit: DefendUnit, data: ShardData) -> torch.Tensor:
    """The images a defend unit defends: the cached attack shard it reads (verified), or the clean images."""
    if unit.spec.images is None:
        return data.images
    key, shard = unit.spec.attack_key, unit.shard
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


def equivariance_scores(rt: Runtime, x: torch.Tensor) -> torch.Tensor:
    """The run's equivariance measure (``measure:``) of a batch, per image (float64, on the CPU)."""
    m = rt.cfg.measure
    views = build_views(m.views)
    params = sample_view_params(views, derive_seed(m.seed, "measure"), tuple(x.shape[-2:]))
    with torch.no_grad():
        return consistency_score(rt.adapter.features, x, views, params).double().cpu()


def _segmentation_counts(
    preds: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore: int | None
) -> tuple[list, list[float]]:
    """Per image, from one confusion matrix: the true-positive, predicted and ground-truth pixel counts per class
    (what a dataset mIoU needs) and the image's own mIoU."""
    counts, ious = [], []
    for p, t in zip(preds, labels, strict=True):
        cm = confusion_matrix(p, t, num_classes, ignore)
        counts.append([cm.diag().tolist(), cm.sum(0).tolist(), cm.sum(1).tolist()])
        ious.append(mean_iou(cm))
    return counts, ious


def defend_shard(rt: Runtime, cache: AdversarialCache, store: RunStore, unit: DefendUnit) -> dict[str, Any]:
    """Defend and score one shard of an (attack, defense) pair into its Parquet file, unless that file is done."""
    pair, shard = unit.spec, unit.shard
    attack, defense = pair.attack, pair.defense
    a_key, d_key = pair.attack_key, pair.defense_key
    if store.shard_done(a_key, d_key, shard):
        return {"status": "done-before", "shard": shard, "seconds": 0.0}
    maybe_fail("defend", shard)
    t0 = time.perf_counter()
    data = load_shard(rt, shard)
    x_in = adversarial_images(rt, cache, unit, data)
    spec = pair.defense_spec
    # Seeded from what the defense is, not from its storage key: the key carries the code version, and a refactor
    # must not redraw a randomised defense's noise (attacks are seeded the same way).
    seeds = seeds_for(rt, data.ids, "defense:" + canonical_json(pair.defense_params))
    draws = pair.eval_draws
    names = metric_names(rt, attack)
    states = {(n, r): _new_state(rt, n) for r in range(draws) for n in names}
    equi_before, equi_after = build_metric("equivariance_score"), build_metric("equivariance_score")
    attack_spec = build_attack(attack.name, **attack.params()) if attack.name != CLEAN else None
    rows: list[dict[str, Any]] = []
    slots = example_slots(shard, rt.cfg.shard_size, rt.cfg.report.examples, len(data.ids))
    restored: list[torch.Tensor] = []  # defended images (draw 0), kept only when this shard holds examples
    # The input's equivariance scores are the same for every defense reading these images: measured by the first
    # unit of the shard, read by the others (tasks.units.measure_key).
    measures = MeasureCache.beside(cache.root)
    shared_before = measures.read(pair.measure_key, shard, data.ids) if pair.measure_key else None
    measured_before: list[float] = []
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
            if shared_before is not None:
                b = torch.tensor(shared_before[sl], dtype=torch.float64)
            else:
                b = equivariance_scores(rt, x)
                measured_before += b.tolist()
            # A defense that left its input unchanged (vanilla; eps_v 0) scores exactly its input: reuse the measure.
            a = b if torch.equal(x_def, x) else equivariance_scores(rt, x_def)
            equi_before.update({"scores": b})
            equi_after.update({"scores": a})
            before, after = b.tolist(), a.tolist()
        linf = (x_def - x).flatten(1).abs().amax(1).mul(255).tolist()
        correct_draws = [[math.nan] * n_batch for _ in range(draws)]
        iou_draws = [[math.nan] * n_batch for _ in range(draws)]
        counts_draws: list[list] = [[None] * n_batch for _ in range(draws)]
        target_counts_draws: list[list] = [[None] * n_batch for _ in range(draws)]
        for r, (_, bt) in enumerate(per_draw):
            if rt.task == "classification":
                correct_draws[r] = [
                    float(p == t) for p, t in zip(bt["preds"].tolist(), bt["labels"].tolist(), strict=True)
                ]
            elif rt.task == "segmentation":
                ignore = rt.dataset.ignore_index
                counts_draws[r], iou_draws[r] = _segmentation_counts(
                    bt["preds"], bt["labels"], rt.dataset.num_classes, ignore
                )
                if targets is not None:  # mIoU to the attack's target map: its interval needs per-image counts too
                    target_counts_draws[r], _ = _segmentation_counts(
                        bt["preds"], bt["attack_targets"], rt.dataset.num_classes, ignore
                    )
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
            if targets is not None:
                row["draw_target_class_counts"] = [c[j] for c in target_counts_draws]
            rows.append(row)
    state = {draw_state_name(n, r): st.to_dict() for (n, r), st in states.items()}
    if rt.cfg.measure.enabled:
        state["equivariance_before"] = equi_before.to_dict()
        state["equivariance_after"] = equi_after.to_dict()
    seconds = time.perf_counter() - t0
    record = {  # the unit as the shard file's footer records it
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
        record_examples(rt, store, data, x_in, torch.cat(restored), slots, record)
    maybe_fail("defend-computed", shard)
    if pair.measure_key and shared_before is None:
        measures.write(pair.measure_key, shard, data.ids, measured_before)
    store.write_shard(record, rows, state)
    return {"status": "computed", "shard": shard, "seconds": seconds}


def record_examples(
    rt: Runtime,
    store: RunStore,
    data: ShardData,
    x_in: torch.Tensor,
    x_def: torch.Tensor,
    slots: list[int],
    unit: dict[str, Any],
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
    store.write_examples(unit, rows)
