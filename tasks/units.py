"""The planned units of a run, built once per run by :func:`plan_units` and passed around as values.

- :class:`AttackSpec`: how one attack's adversarial images are made and the cache key they are stored under. An
  attack that does not see the defense has one (its images serve every defense); a defense-aware attack (BPDA, AA,
  Square) has one per defense, with that defense resolved at the attack's eps.
- :class:`UnitSpec`: one (attack, defense) pair: the defense resolved at the attack's eps (budgets and, for
  head-based defenses, the run's model), its evaluation draws, and the attack, defense and unit keys.
- :class:`AttackUnit` / :class:`DefendUnit`: a spec and a shard: the shard-level work the flow submits (to the
  in-process runner or as Prefect tasks; they pickle) and records failures under.

The keys are computed by the functions below exactly as before there were units; resolving a defense (which hashes
a self-supervised defense's head files) and computing the keys now happen once per pair, at planning time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from equicore.attacks import build_attack
from equicore.defenses import build_defense
from storage.keys import canonical_json, content_key
from tasks.code_identity import attack_code, defense_code, measure_code, model_code
from tasks.config import CLEAN, AttackConfig, DefenseConfig
from tasks.runtime import Runtime, plan_shards

CLEAN_ATTACK = AttackConfig(name=CLEAN)  # resolves a defense's budgets without an attack (reference eps)
NO_TARGET = -1  # the target index of images made without a defense (they serve every defense)


# ---------------------------------------------------------------------------------------------------- identities
def resolved_defense(rt: Runtime, attack: AttackConfig, defense: DefenseConfig) -> Any:
    """The defense with its budgets resolved from the attack's eps (and, for head-based defenses, the run's model)."""
    eps = attack.eps if attack.name != CLEAN else rt.cfg.resolved_reference_eps()
    spec = build_defense(defense.name, **defense.params()).with_attack_eps(eps)
    if getattr(spec, "head", "") is None and hasattr(spec, "for_model"):
        spec = dataclasses.replace(spec, for_model=rt.cfg.model.name)
    return spec


def attack_identity(rt: Runtime, attack: AttackConfig, target_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the adversarial images depend on (the cache key hashes it with the versions of the code they ran,
    :mod:`tasks.code_identity`); for a defense-aware attack (BPDA, AA) that includes ``target_params``, the attacked
    defense's resolved parameters."""
    params = build_attack(attack.name, **attack.params()).params() if attack.name != CLEAN else {}
    ident: dict[str, Any] = {
        "dataset": rt.dataset_fingerprint,
        "indices": content_key(rt.indices, ""),
        "shard_size": rt.cfg.shard_size,
        "model": {
            "name": rt.cfg.model.label,
            "weights": rt.model_digest,
            "params": rt.cfg.model.params,
            "adapter": rt.cfg.model.adapter,
            **rt.cfg.model.identity(),  # a factory or file model: what it is, its task and input normalisation
        },
        "attack": {"name": attack.name, **params},
        "seed": rt.cfg.seed,
    }
    if attack.defense_aware:
        if target_params is None:
            raise ValueError(f"attack {attack.name!r} is defense-aware: its identity needs the defense")
        ident["defense"] = target_params
    return ident


def defense_identity(rt: Runtime, defense_params: dict[str, Any], draws: int) -> dict[str, Any]:
    """Everything a unit's scores depend on besides its images: the resolved defense, the measure, the draws."""
    ident: dict[str, Any] = {"defense": defense_params, "measure": rt.cfg.measure.model_dump()}
    if draws > 1:  # one draw keeps the key it had before draws existed
        ident["eval_draws"] = draws
    return ident


def measure_key(rt: Runtime, images_key: str) -> str | None:
    """The key of the equivariance scores of one set of input images (``storage.measure_cache``), shared by every
    defense that reads those images; None when the run does not measure. ``images_key`` is the images' cache key, or
    for the clean images the key the clean pseudo-attack's identity hashes to (dataset, selection, model)."""
    if not rt.cfg.measure.enabled:
        return None
    ident = {"images": images_key, "measure": rt.cfg.measure.model_dump(), "batch_size": rt.cfg.batch_size}
    return content_key(ident, canonical_json({"measure": measure_code(), **model_code(rt)}))


def unit_key(attack_k: str, defense_k: str | None = None) -> str:
    return f"{attack_k}.{defense_k}" if defense_k else attack_k


# ---------------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class AttackSpec:
    """One attack's adversarial images (for one target defense when the attack is defense-aware).

    Equal (and hashed) by attack index, target index and key; the rest is what the attack step needs.
    """

    attack_index: int
    target_index: int  # the attacked defense's index; NO_TARGET when the images serve every defense
    attack_key: str
    attack: AttackConfig = field(compare=False, repr=False)
    target: DefenseConfig | None = field(compare=False, repr=False)
    target_defense: Any = field(compare=False, repr=False)  # resolved at the attack's eps; None without a target
    identity: dict[str, Any] = field(compare=False, repr=False)  # hashed into attack_key (recorded in the cache)
    code: dict[str, str] = field(compare=False, repr=False)  # component versions, hashed into attack_key

    @property
    def unit_key(self) -> str:
        return unit_key(self.attack_key)

    @property
    def label(self) -> str:
        against = f" against {self.target.name}" if self.target is not None else ""
        return f"attack {self.attack.name}{against}"


@dataclass(frozen=True)
class UnitSpec:
    """One (attack, defense) pair of a run. Equal (and hashed) by indices and keys."""

    attack_index: int
    defense_index: int
    attack_key: str
    defense_key: str
    attack: AttackConfig = field(compare=False, repr=False)
    defense: DefenseConfig = field(compare=False, repr=False)
    defense_spec: Any = field(compare=False, repr=False)  # the defense resolved at the attack's eps (purifies)
    defense_params: dict[str, Any] = field(compare=False, repr=False)  # defense_spec.params(), computed once
    eval_draws: int = field(compare=False, repr=False)  # independent draws of the defense's randomness per image
    images: AttackSpec | None = field(compare=False, repr=False)  # None for the clean pseudo-attack
    measure_key: str | None = field(default=None, compare=False, repr=False)  # shared "before" scores (None: off)

    @property
    def unit_key(self) -> str:
        return unit_key(self.attack_key, self.defense_key)

    @property
    def label(self) -> str:
        return f"attack {self.attack.name} / defense {self.defense.name}"


@dataclass(frozen=True)
class RunUnits:
    """Every spec of a run, in config order (pairs attack-major), and the defenses at the reference eps."""

    pairs: tuple[UnitSpec, ...]
    images: tuple[AttackSpec, ...]  # per attack in config order, by target index; none for clean
    reference_defenses: tuple[Any, ...]  # each defense resolved without an attack: its declared properties
    n_shards: int

    def pairs_of(self, attack_index: int) -> list[UnitSpec]:
        return [p for p in self.pairs if p.attack_index == attack_index]

    def images_of(self, attack_index: int) -> list[AttackSpec]:
        return [s for s in self.images if s.attack_index == attack_index]

    @property
    def n_attacks(self) -> int:
        return len({p.attack_index for p in self.pairs})


# ---------------------------------------------------------------------------------------------------- shard units
@dataclass(frozen=True)
class ShardUnit:
    """A spec and a shard; named, keyed and labelled by its spec."""

    spec: AttackSpec | UnitSpec
    shard: int

    kind: ClassVar[str] = ""  # what a progress display counts it as

    @property
    def unit_key(self) -> str:
        return self.spec.unit_key

    @property
    def label(self) -> str:
        return self.spec.label


@dataclass(frozen=True)
class AttackUnit(ShardUnit):
    """One shard of an attack's adversarial images (-> the Zarr cache)."""

    spec: AttackSpec

    kind: ClassVar[str] = "attack"

    def legacy_id(self) -> tuple[str, int, int, int]:
        """The tuple this unit was before units were values; failures are listed in its string order."""
        return ("attack", self.spec.attack_index, self.spec.target_index, self.shard)


@dataclass(frozen=True)
class DefendUnit(ShardUnit):
    """One shard of an (attack, defense) pair: purify, predict and score (-> one Parquet file)."""

    spec: UnitSpec

    kind: ClassVar[str] = "defend"

    @property
    def upstream(self) -> AttackUnit | None:
        """The attack shard whose images this unit reads (None for clean images)."""
        return AttackUnit(self.spec.images, self.shard) if self.spec.images is not None else None

    def legacy_id(self) -> tuple[str, int, int, int]:
        return ("defend", self.spec.attack_index, self.spec.defense_index, self.shard)


# ---------------------------------------------------------------------------------------------------- planning
def _attack_spec(
    rt: Runtime,
    attack_index: int,
    target_index: int = NO_TARGET,
    target: DefenseConfig | None = None,
    target_defense: Any = None,
    target_params: dict[str, Any] | None = None,
) -> AttackSpec:
    attack = rt.cfg.attacks[attack_index]
    identity = attack_identity(rt, attack, target_params)
    code = attack_code(rt, attack, target)
    return AttackSpec(
        attack_index=attack_index,
        target_index=target_index,
        attack_key=content_key(identity, canonical_json(code)),
        attack=attack,
        target=target,
        target_defense=target_defense,
        identity=identity,
        code=code,
    )


def plan_units(rt: Runtime) -> RunUnits:
    """Resolve every (attack, defense) pair and compute its keys, once for the whole run."""
    cfg = rt.cfg
    defense_codes = [canonical_json(defense_code(rt, d)) for d in cfg.defenses]
    pairs: list[UnitSpec] = []
    images: list[AttackSpec] = []
    for ai, attack in enumerate(cfg.attacks):
        aware = attack.defense_aware
        shared = None  # the images of an attack that does not see the defense, made once for every defense
        if attack.name != CLEAN and not aware:
            shared = _attack_spec(rt, ai)
            images.append(shared)
        # The measure of images every defense reads, keyed once; the clean images' identity (dataset, selection,
        # model) keys theirs (they are not cached). A defense-aware attack's images are the defense's own.
        shared_measure = None
        if shared is not None or attack.name == CLEAN:
            shared_measure = measure_key(rt, (shared or _attack_spec(rt, ai)).attack_key)
        for di, defense in enumerate(cfg.defenses):
            spec = resolved_defense(rt, attack, defense)
            params = spec.params()
            draws = defense.resolved_eval_draws(bool(spec.randomized))
            own = _attack_spec(rt, ai, di, defense, spec, params) if aware else None
            if own is not None:
                images.append(own)
            source = own or shared
            pairs.append(
                UnitSpec(
                    attack_index=ai,
                    defense_index=di,
                    attack_key=source.attack_key if source is not None else CLEAN,
                    defense_key=content_key(defense_identity(rt, params, draws), defense_codes[di]),
                    attack=attack,
                    defense=defense,
                    defense_spec=spec,
                    defense_params=params,
                    eval_draws=draws,
                    images=source,
                    measure_key=measure_key(rt, own.attack_key) if own is not None else shared_measure,
                )
            )
    reference = tuple(resolved_defense(rt, CLEAN_ATTACK, d) for d in cfg.defenses)
    return RunUnits(tuple(pairs), tuple(images), reference, len(plan_shards(rt.indices, cfg.shard_size)))


def outcome_order(units: Sequence[AttackUnit | DefendUnit]) -> list[AttackUnit | DefendUnit]:
    """Units in the order their outcomes have always been recorded and listed (by the string of their old tuple)."""
    return sorted(units, key=lambda u: str(u.legacy_id()))
