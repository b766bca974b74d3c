"""``equi run --dry-run``: the plan of a config and what it would cost, without computing or writing anything.

The cost is counted in *image passes*: one forward and backward pass of the model on one image (or one view of it).
It is an upper bound from the declared budgets (attack steps x restarts x targets x EOT draws, Square's query budget,
defense steps x views, the measure's views): APGD restarts and Square stop early on images already fooled. With
``estimate_seconds`` the time of one image pass is measured here on a batch of the run's own images, so the estimate
is this machine's, single process; Dask workers divide it roughly by their number.

Unlike planning a real run (:func:`flows.planning.plan_work`), nothing is repaired or removed: a shard counts as
done when its file exists, an attack shard as cached when the cache has its completion marker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from storage.cache import AdversarialCache
from storage.run_store import RunStore
from tasks.config import RunConfig
from tasks.unit_cost import attack_passes, measure_passes, pair_passes
from tasks.units import RunUnits, UnitSpec


@dataclass(frozen=True)
class PlanRow:
    what: str  # "attack pgd" or "attack pgd / defense equivariance"
    shards_done: int
    shards_to_compute: int
    passes_per_image: float
    passes_to_compute: float


def entry_labels(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """Attack and defense labels as the report writes them: entries sharing a name are told apart by the parameters
    that differ (``equivariance (eta=3)``)."""
    from reports.tables import entry_parts, join_label

    attacks = entry_parts([(a.name, a.params()) for a in cfg.attacks])
    defenses = entry_parts([(d.name, d.params()) for d in cfg.defenses])
    return [join_label(*p) for p in attacks], [join_label(*p) for p in defenses]


def plan_rows(cfg: RunConfig, units: RunUnits, shard_sizes: list[int]) -> list[PlanRow]:
    attack_label, defense_label = entry_labels(cfg)
    store = RunStore(cfg.results_dir, cfg.run_id())
    cache = AdversarialCache(cfg.cache_dir)
    rows: list[PlanRow] = []
    measure = measure_passes(cfg)
    measured = set()  # measure keys whose "before" scores an earlier pair computes (shared, storage.measure_cache)
    for spec in units.images:
        done = [cache.has(spec.attack_key, s) for s in range(units.n_shards)]
        per_image = attack_passes(spec)
        todo = sum(n for n, d in zip(shard_sizes, done, strict=True) if not d)
        label = f"attack {attack_label[spec.attack_index]}"
        if spec.target is not None:
            label += f" against {defense_label[spec.target_index]}"
        rows.append(PlanRow(label, sum(done), done.count(False), per_image, per_image * todo))
    for pair in units.pairs:
        pair_spec: UnitSpec = pair
        done = [store.shard_path(pair.attack_key, pair.defense_key, s).exists() for s in range(units.n_shards)]
        # "before" once per input images (shared by the pairs of those images)
        before = pair.measure_key is not None and pair.measure_key not in measured
        measured.add(pair.measure_key)
        per_image = pair_passes(pair_spec, measure, measures_before=before)
        todo = sum(n for n, d in zip(shard_sizes, done, strict=True) if not d)
        label = f"attack {attack_label[pair.attack_index]} / defense {defense_label[pair.defense_index]}"
        rows.append(PlanRow(label, sum(done), done.count(False), per_image, per_image * todo))
    return rows


def seconds_per_pass(rt: Any, n_images: int = 4, repeats: int = 3) -> float:
    """Median time of one forward+backward pass per image on a batch of the run's first images."""
    import torch

    x, _, _ = rt.batch(rt.indices[:n_images])
    times = []
    for _ in range(repeats):
        xi = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = rt.adapter.forward(xi)
        value = out.logits if isinstance(out.logits, torch.Tensor) else out.features
        value.float().sum().backward()
        times.append((time.perf_counter() - t0) / x.shape[0])
    return sorted(times)[len(times) // 2]


def dry_run(cfg: RunConfig, estimate_seconds: bool = True) -> dict[str, Any]:
    """The plan of ``cfg`` as a dict: per attack and (attack, defense) its shards done / to compute and passes."""
    from tasks.runtime import build_runtime
    from tasks.units import plan_units

    rt = build_runtime(cfg)
    units = plan_units(rt)
    sizes = rt.shard_sizes()
    rows = plan_rows(cfg, units, sizes)
    total = sum(r.passes_to_compute for r in rows)
    out: dict[str, Any] = {
        "run_id": cfg.run_id(),
        "n_samples": len(rt.indices),
        "n_shards": units.n_shards,
        "rows": [r.__dict__ for r in rows],
        "passes_to_compute": total,
        "units_to_compute": sum(r.shards_to_compute for r in rows),
        "units_done": sum(r.shards_done for r in rows),
    }
    if estimate_seconds:
        per_pass = seconds_per_pass(rt)
        out["seconds_per_pass"] = per_pass
        out["estimated_seconds_one_process"] = per_pass * total
    return out
