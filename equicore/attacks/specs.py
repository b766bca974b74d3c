"""Registered attacks: each is the projected-gradient loop with its step rules and the name of its loss.

``ATTACKS.build("pgd", eps=8, steps=20)`` returns an :class:`Attack`; :func:`run_attack` builds the loss for the
adapter and labels (outside the attack), picks targets for targeted attacks, and runs the loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from equicore.adapters import TaskAdapter
from equicore.attacks.adaptive import adaptive_loss, bpda_loss
from equicore.attacks.loop import NORMS, LossFn, projected_gradient
from equicore.attacks.losses import build_loss
from equicore.defenses.base import Defense
from equicore.errors import InvalidInputError
from equicore.registry import ATTACKS, LOSSES
from equicore.seeding import as_seed_list
from equicore.validation import check_batch_match, check_eps, check_images

TARGET_MODES = ("next", "least_likely")
ADAPTIVE_KINDS = ("bpda", "aa")  # defense-aware attacks: run_attack needs the defense they attack


@dataclass(frozen=True)
class Attack:
    """Threat model and step rules. ``eps``/``step_size`` in /255 units."""

    name: str
    eps: float = 4.0
    step_size: float = 1.0
    steps: int = 10
    norm: str = "linf"
    random_init: bool = True
    momentum: float | None = None
    loss: str = "ce"
    loss_params: dict[str, Any] = field(default_factory=dict)
    targeted: bool = False
    target: str = "next"  # how targets are chosen for targeted attacks: "next", "least_likely" or "class:<k>"
    adaptive: str | None = None  # None, "bpda" or "aa" (set by the registered attack, not by users)
    eot: int = 1  # BPDA: gradient averaged over this many draws of a randomised defense
    lambda_e: float = 0.0  # AA: weight of the defense's self-consistency objective (paper eq. 6)
    fallback_views: str = "paper"  # AA: equivariance views for defenses without an objective of their own

    def __post_init__(self) -> None:
        check_eps(self.eps, f"{self.name}.eps")
        check_eps(self.step_size, f"{self.name}.step_size", upper=255.0)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InvalidInputError(f"{self.name}.steps: expected an integer >= 1, got {self.steps!r}")
        if self.norm not in NORMS:
            raise InvalidInputError(f"{self.name}.norm: expected one of {NORMS}, got {self.norm!r}")
        if self.momentum is not None and not self.momentum >= 0:
            raise InvalidInputError(f"{self.name}.momentum: expected >= 0, got {self.momentum!r}")
        LOSSES.get(self.loss)
        if self.target not in TARGET_MODES and not self.target.startswith("class:"):
            raise InvalidInputError(f"{self.name}.target: expected one of {TARGET_MODES} or 'class:<k>'")
        if self.adaptive not in (None, *ADAPTIVE_KINDS):
            raise InvalidInputError(f"{self.name}.adaptive: expected None or one of {ADAPTIVE_KINDS}")
        if isinstance(self.eot, bool) or not isinstance(self.eot, int) or self.eot < 1:
            raise InvalidInputError(f"{self.name}.eot: expected an integer >= 1, got {self.eot!r}")
        if isinstance(self.lambda_e, bool) or not isinstance(self.lambda_e, (int, float)):
            raise InvalidInputError(f"{self.name}.lambda_e: expected a number >= 0, got {self.lambda_e!r}")
        if not 0 <= self.lambda_e < float("inf"):
            raise InvalidInputError(f"{self.name}.lambda_e: expected a finite value >= 0, got {self.lambda_e!r}")
        if self.eot != 1 and self.adaptive != "bpda":
            raise InvalidInputError(f"{self.name}.eot: only BPDA averages over the defense's randomness")
        if self.lambda_e != 0 and self.adaptive != "aa":
            raise InvalidInputError(f"{self.name}.lambda_e: only the adaptive attack 'aa' has an equivariance term")

    @property
    def defense_aware(self) -> bool:
        """True when the adversarial images depend on the defense (its cache key must include the defense)."""
        return self.adaptive is not None

    def params(self) -> dict[str, Any]:
        """Canonical parameters (for cache keys and results tables)."""
        return dataclasses.asdict(self)

    def perturb(self, x: torch.Tensor, loss_fn: LossFn, seeds: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        return projected_gradient(
            loss_fn,
            x,
            eps=self.eps,
            step_size=self.step_size,
            steps=self.steps,
            norm=self.norm,
            random_init=self.random_init,
            momentum=self.momentum,
            seeds=seeds,
        )


@dataclass
class AttackResult:
    x_adv: torch.Tensor
    targets: torch.Tensor | None  # the attack's targets when targeted


def make_targets(adapter: TaskAdapter, x: torch.Tensor, y: torch.Tensor, mode: str) -> torch.Tensor:
    """Targets for a targeted attack; ignored segmentation pixels stay ignored."""
    num_classes = adapter.num_classes
    if mode == "least_likely" or num_classes is None:
        with torch.no_grad():
            logits = adapter.logits(x)
        num_classes = logits.shape[1]
    if mode == "next":
        t = (y + 1) % num_classes
    elif mode == "least_likely":
        t = logits.argmin(1)
    else:
        k = int(mode.split(":", 1)[1])
        if not 0 <= k < num_classes:
            raise InvalidInputError(f"target class {k} out of range [0, {num_classes})")
        t = torch.full_like(y, k)
    ignore = getattr(adapter, "ignore_index", None)
    if ignore is not None and y.ndim > 1:
        t = torch.where(y == ignore, y, t)
    return t


def run_attack(
    attack: Attack,
    adapter: TaskAdapter,
    x: torch.Tensor,
    y: torch.Tensor | Sequence[Mapping[str, Any]],
    seeds: Sequence[int] | torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    defense: Defense | None = None,
) -> AttackResult:
    """Build the attack's loss for this adapter and these labels (unless one is passed), wrap it with the defense
    for BPDA/AA, then run the loop. ``defense`` must be given (with its budgets resolved) for those attacks."""
    # Images first: a 3-D image would otherwise be reported as a label batch-size mismatch, or reach the model.
    check_images(x, "attack input")
    if isinstance(y, torch.Tensor):
        check_batch_match(x, y)
    else:
        # Instance targets: one dict per image (their instance counts differ, so they do not stack).
        if not isinstance(y, Sequence) or isinstance(y, (str, bytes)):
            raise InvalidInputError(f"labels: expected a tensor or a list of target dicts, got {type(y).__name__}")
        if len(y) != x.shape[0]:
            raise InvalidInputError(f"labels: {len(y)} targets do not match images' batch size {x.shape[0]}")
        if attack.targeted:
            raise InvalidInputError(f"{attack.name}: targeted attacks are not defined for instance targets")
    targets = make_targets(adapter, x, y, attack.target) if attack.targeted else None
    if loss_fn is None:
        labels = targets if targets is not None else y
        loss_fn = build_loss(attack.loss, adapter, labels, targeted=attack.targeted, **attack.loss_params)
    if attack.defense_aware:
        if defense is None:
            raise InvalidInputError(f"attack {attack.name!r} is defense-aware: pass the defense it attacks")
        if attack.adaptive == "bpda":
            loss_fn = bpda_loss(loss_fn, defense, adapter, as_seed_list(seeds, x.shape[0]), attack.eot)
        else:
            loss_fn = adaptive_loss(loss_fn, defense, adapter, attack.lambda_e, attack.fallback_views)
    return AttackResult(attack.perturb(x, loss_fn, seeds), targets)


_ACCEPTED = frozenset(f.name for f in dataclasses.fields(Attack)) - {"name", "adaptive"}


def _factory(name: str, **defaults: Any):
    # The factory validates its own parameters: it takes **params, so Registry.build cannot see what it accepts and
    # a typo would otherwise surface as a bare TypeError from the dataclass.
    def build(**params: Any) -> Attack:
        unknown = sorted(set(params) - _ACCEPTED)
        if unknown:
            raise InvalidInputError(
                f"attack {name!r} got unknown parameter(s) {unknown}; it accepts {sorted(_ACCEPTED)}"
            )
        merged = {**defaults, **params}
        # FGSM steps once by eps unless told otherwise; applied here so ATTACKS.build and build_attack agree.
        if name == "fgsm" and "eps" in params and "step_size" not in params:
            merged["step_size"] = params["eps"]
        return Attack(name=name, **merged)

    build.__name__ = f"build_{name}"
    build.accepted = _ACCEPTED  # type: ignore[attr-defined]
    return build


_REGISTERED = {
    # name: (defaults, metadata)
    "fgsm": dict(steps=1, step_size=4.0, random_init=False),
    "ifgsm": dict(steps=10, step_size=1.0, random_init=False),
    "pgd": dict(steps=10, step_size=1.0, random_init=True),
    "mim": dict(steps=10, step_size=1.0, random_init=False, momentum=1.0),
    "cw": dict(steps=10, step_size=1.0, random_init=True, loss="cw"),
    "houdini": dict(steps=10, step_size=1.0, random_init=True, loss="houdini"),
    # Defense-aware: PGD steps on a loss that sees the defense (straight through it, or its objective).
    "bpda": dict(steps=10, step_size=1.0, random_init=True, adaptive="bpda"),
    "aa": dict(steps=10, step_size=1.0, random_init=True, adaptive="aa", lambda_e=1.0),
}

for _name, _defaults in _REGISTERED.items():
    ATTACKS.register(_name, loss=_defaults.get("loss", "ce"), defense_aware=_defaults.get("adaptive") is not None)(
        _factory(_name, **_defaults)
    )


def build_attack(name: str, **params: Any) -> Attack:
    """``fgsm`` steps once by eps unless told otherwise (the registered factories validate and apply that)."""
    return ATTACKS.build(name, **params)
