"""What is left to compute in a run: the planned units (:func:`tasks.units.plan_units`) whose outputs do not exist
or fail their checksums. Damaged outputs are removed here and planned again, so a resume regenerates them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, model_serializer

from storage.cache import AdversarialCache
from storage.errors import CacheCorruptError, CacheMissError, ResultCorruptError
from storage.run_store import RunStore
from tasks.unit_cost import submission_priorities
from tasks.units import AttackUnit, DefendUnit, RunUnits, UnitSpec

Outcome = dict[AttackUnit | DefendUnit, tuple[str, str]]  # unit -> ("ok" | "failed", message)


class WorkPlan(BaseModel):
    """The units still to compute. A pydantic model only for how the Prefect API records it (the flow's parameter,
    as JSON): as its counts, not as tens of thousands of units with their specs; the units are not validated or
    copied, the plan holds the very values planned."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    # Attack shards still to compute: one per shard for attacks that do not see the defense (their images serve
    # every defense), one per (defense, shard) for BPDA/AA.
    attack_units: SkipValidation[list[AttackUnit]]
    defend_units: SkipValidation[list[DefendUnit]]  # (attack, defense) shards still to compute
    n_shards: int
    total_defend: int
    repaired: list[str] = Field(default_factory=list)  # damaged files found by their checksums, to be regenerated
    # Dask priority per unit (higher first; :func:`tasks.unit_cost.submission_priorities`); none: the plan's order.
    priorities: SkipValidation[dict[AttackUnit | DefendUnit, int]] = Field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.attack_units and not self.defend_units

    def prioritised(self, shard_sizes: list[int], measure: float) -> WorkPlan:
        """The same plan with the cluster's priorities: the longest chain of work first."""
        ranks = submission_priorities(self.attack_units, self.defend_units, shard_sizes, measure)
        return self.model_copy(update={"priorities": ranks})

    @model_serializer
    def _counts(self) -> dict[str, Any]:
        return {
            "attack_units": len(self.attack_units),
            "defend_units": len(self.defend_units),
            "n_shards": self.n_shards,
            "total_defend": self.total_defend,
            "repaired": self.repaired,
        }


def storage_reason(message: str) -> str:
    """A storage error's finding without its advice to API callers ("call invalidate(...)", "delete and recompute
    it"): the plan does exactly that, so the report keeps only what was found."""
    for advice in ("; call invalidate(", "; delete and recompute it"):
        message = message.split(advice)[0]
    return message


def shard_file_problem(store: RunStore, unit: UnitSpec, shard: int) -> str | None:
    """Why a committed shard file cannot be used (None if it reads back whole): footer, metric state and every
    page are checked against the checksums written with them, so a truncated or garbled file is never reduced."""
    try:
        store.read_shard(unit.attack_key, unit.defense_key, shard)
    except FileNotFoundError:
        return None
    except ResultCorruptError as exc:
        return storage_reason(str(exc))
    return None


def plan_work(units: RunUnits, store: RunStore, cache: AdversarialCache) -> WorkPlan:
    """What is left to compute. Damaged outputs (a shard file or cache entry failing its checksums) are removed
    here, reported in ``WorkPlan.repaired``, and planned again."""
    attack_units: list[AttackUnit] = []
    defend_units: list[DefendUnit] = []
    repaired: list[str] = []
    for attack_index in range(units.n_attacks):
        pairs, images = units.pairs_of(attack_index), units.images_of(attack_index)
        for shard in range(units.n_shards):
            for pair in pairs:
                if not store.shard_path(pair.attack_key, pair.defense_key, shard).exists():
                    defend_units.append(DefendUnit(pair, shard))
                    continue
                problem = shard_file_problem(store, pair, shard)
                if problem:
                    repaired.append(f"{problem}; regenerating it")
                    store.discard_shard(pair.attack_key, pair.defense_key, shard)
                    defend_units.append(DefendUnit(pair, shard))
            for spec in images:  # none for clean
                # A cache entry that fails its checksum (a corrupt or deleted chunk) is regenerated even when every
                # defense of the shard is done: the cache is shared with later runs and must stay trustworthy.
                try:
                    cache.read(spec.attack_key, shard)
                    continue
                except CacheMissError:
                    pass  # never completed (or its writer was killed before the marker): nothing to report
                except CacheCorruptError as exc:
                    repaired.append(f"attack {spec.attack.name}: {storage_reason(str(exc))}; regenerating it")
                cache.invalidate(spec.attack_key, shard)
                attack_units.append(AttackUnit(spec, shard))
    total = len(units.pairs) * units.n_shards
    return WorkPlan(
        attack_units=attack_units,
        defend_units=defend_units,
        n_shards=units.n_shards,
        total_defend=total,
        repaired=repaired,
    )
