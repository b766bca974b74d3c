"""Registered attacks: the defaults of each named attack (an optimiser, its step rules, the name of its loss) and
the modules its maths live in.

``ATTACKS.build("pgd", eps=8, steps=20)`` returns an :class:`~equicore.attacks.attack.Attack`;
:func:`~equicore.attacks.run.run_attack` runs it.

This module holds only data: the defaults reach the numbers through ``Attack.params()``, which every cache key
already holds, so the code identity of an attack (``ATTACKS.code_version``, :func:`attack_code_version`) covers the
modules an attack runs (``attack``, ``run``, its optimiser, its loss, seeding) and not this one: adding or tuning
another attack here leaves the identity of pgd as it was.
"""

from __future__ import annotations

from typing import Any

from equicore.attacks.attack import (
    ADAPTIVE_KINDS,
    OPTIMIZERS,
    TARGET_MODES,
    Attack,
    AttackResult,
    attack_factory,
    make_targets,
)
from equicore.attacks.run import run_attack
from equicore.code_identity import code_version
from equicore.registry import ATTACKS, LOSSES
from equicore.transforms import TRANSFORM_MODULES

__all__ = [
    "ADAPTIVE_KINDS",
    "OPTIMIZERS",
    "TARGET_MODES",
    "Attack",
    "AttackResult",
    "attack_code_version",
    "attack_modules",
    "build_attack",
    "make_targets",
    "run_attack",
]

# Where an attack's maths live: what every attack runs, then per optimiser, per defense-aware kind, and the top-k
# target sweep. APGD steps with the loop's per-sample norms, so its modules include the loop's.
RUN_MODULES = ("equicore.attacks.attack", "equicore.attacks.run", "equicore.seeding")
OPTIMIZER_MODULES = {
    "pgd": ("equicore.attacks.loop",),
    "apgd": ("equicore.attacks.apgd", "equicore.attacks.loop"),
    "square": ("equicore.attacks.square",),
}
# AA falls back on the equivariance objective over views for defenses without an objective of their own.
ADAPTIVE_MODULES = {
    "bpda": ("equicore.attacks.adaptive",),
    "aa": ("equicore.attacks.adaptive", "equicore.equivariance", *TRANSFORM_MODULES),
}
TOP_K_MODULES = ("equicore.attacks.apgd_t",)


def attack_modules(optimizer: str, adaptive: str | None, target: str, loss: str) -> tuple[str, ...]:
    """The modules an attack with these settings runs: the shared run, its optimiser, BPDA/AA, the top-k sweep, and
    its loss's modules (Square queries the model's margins and runs no registered loss)."""
    modules = [*RUN_MODULES, *OPTIMIZER_MODULES[optimizer]]
    if adaptive is not None:
        modules += ADAPTIVE_MODULES[adaptive]
    if target == "top":
        modules += TOP_K_MODULES
    if optimizer != "square":
        modules += LOSSES.modules(loss)
    return tuple(dict.fromkeys(modules))


def attack_code_version(attack: Attack) -> str:
    """The code identity of a built attack, ``"<version>:<16 hex>"``: its registered version and the digest of the
    modules it runs with ITS settings (optimiser, defense-aware kind, targets, loss), which may differ from its
    registered defaults (``pgd`` with ``loss: dlr``). For an attack built with its defaults it equals
    ``ATTACKS.code_version(name)``. A loss's own ``version`` is in ``LOSSES.code_version(attack.loss)``."""
    modules = attack_modules(attack.optimizer, attack.adaptive, attack.target, attack.loss)
    return code_version(ATTACKS.version(attack.name), modules)


_REGISTERED = {
    # name: defaults
    "fgsm": dict(steps=1, step_size=4.0, random_init=False),
    "ifgsm": dict(steps=10, step_size=1.0, random_init=False),
    "pgd": dict(steps=10, step_size=1.0, random_init=True),
    "mim": dict(steps=10, step_size=1.0, random_init=False, momentum=1.0),
    "cw": dict(steps=10, step_size=1.0, random_init=True, loss="cw"),
    "houdini": dict(steps=10, step_size=1.0, random_init=True, loss="houdini"),
    # AutoAttack's gradient attacks: APGD (CE by default; loss: dlr for APGD-DLR) and APGD-T (targeted DLR over the
    # top-9 other classes), 100 steps each as in AutoAttack's 'standard' version.
    "apgd": dict(steps=100, optimizer="apgd"),
    "apgd_t": dict(steps=100, optimizer="apgd", loss="dlr", targeted=True, target="top"),
    # Score-based, no gradient: the gradient-masking check (5000 queries as in AutoAttack).
    "square": dict(optimizer="square", loss="cw"),
    # Defense-aware. Strong by default (AutoAttack's 'rand' version): APGD, 100 steps, and for a randomised defense
    # the BPDA gradient averaged over 20 draws. Set optimizer: pgd (with step_size) for the paper's PGD-based runs.
    "bpda": dict(steps=100, optimizer="apgd", adaptive="bpda", eot=20),
    "aa": dict(steps=100, optimizer="apgd", adaptive="aa", lambda_e=1.0),
}
_TASKS = {"square": ("classification",)}

for _name, _defaults in _REGISTERED.items():
    _factory = attack_factory(_name, **_defaults)
    _default = _factory()
    ATTACKS.add(
        _name,
        _factory,
        modules=attack_modules(_default.optimizer, _default.adaptive, _default.target, _default.loss),
        loss=_defaults.get("loss", "ce"),
        defense_aware=_defaults.get("adaptive") is not None or _defaults.get("optimizer") == "square",
        optimizer=_defaults.get("optimizer", "pgd"),
        **({"tasks": _TASKS[_name]} if _name in _TASKS else {}),
    )


def build_attack(name: str, **params: Any) -> Attack:
    """``fgsm`` steps once by eps unless told otherwise (the registered factories validate and apply that)."""
    return ATTACKS.build(name, **params)
