"""An attack's threat model and step rules (:class:`Attack`), its targets, and how its task loss is wrapped with the
defense it attacks (BPDA, AA). ``equicore.attacks.run`` runs it; ``equicore.attacks.specs`` registers the named
attacks (pgd, apgd, square, ...) as factories made here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from equicore.adapters import TaskAdapter
from equicore.attacks.adaptive import adaptive_loss, bpda_loss
from equicore.attacks.apgd import APGDResult, apgd
from equicore.attacks.loop import NORMS, LossFn, projected_gradient
from equicore.defenses.base import Defense
from equicore.errors import InvalidInputError
from equicore.registry import LOSSES
from equicore.seeding import as_seed_list
from equicore.validation import check_eps, check_positive_int

TARGET_MODES = ("next", "least_likely", "top")  # "top": AutoAttack's sweep over the top-k other classes (APGD-T)
ADAPTIVE_KINDS = ("bpda", "aa")  # defense-aware attacks: run_attack needs the defense they attack
OPTIMIZERS = ("pgd", "apgd", "square")
# Fields added with APGD and Square (issue #16): left out of a projected-gradient attack's canonical parameters.
_NEWER_FIELDS = ("optimizer", "n_restarts", "rho", "n_target_classes", "n_queries", "p_init")
# Parameters that only one optimiser reads, with their defaults: setting one for another optimiser is an error.
_OPTIMIZER_ONLY = {
    "momentum": ("pgd", None),
    "n_restarts": ("apgd", 1),
    "rho": ("apgd", 0.75),
    "n_queries": ("square", 5000),
    "p_init": ("square", 0.8),
}


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
    optimizer: str = "pgd"  # "pgd" (the one loop), "apgd" (Croce & Hein 2020) or "square" (score-based, no gradient)
    n_restarts: int = 1  # APGD: restarts, each only on samples not yet fooled
    rho: float = 0.75  # APGD: checkpoint condition (step size halves if the loss rose in <= rho of the steps)
    n_target_classes: int = 9  # target "top": the k highest-scoring other classes, one APGD-T run each
    n_queries: int = 5000  # Square: query budget per image
    p_init: float = 0.8  # Square: initial fraction of pixels in the square

    def __post_init__(self) -> None:
        check_eps(self.eps, f"{self.name}.eps")
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInputError(f"{self.name}.optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        for param, (owner, default) in _OPTIMIZER_ONLY.items():
            if self.optimizer != owner and getattr(self, param) != default:
                raise InvalidInputError(
                    f"{self.name}.{param}: only the {owner} optimizer reads it, not {self.optimizer}"
                )
        for param in ("n_restarts", "n_target_classes", "n_queries"):
            check_positive_int(getattr(self, param), f"{self.name}.{param}")
        for param in ("rho", "p_init"):
            value = getattr(self, param)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise InvalidInputError(f"{self.name}.{param}: expected a number in (0, 1], got {value!r}")
        if self.n_target_classes != 9 and self.target != "top":
            raise InvalidInputError(f"{self.name}.n_target_classes: only the target 'top' reads it")
        if self.target == "top" and self.optimizer != "apgd":
            raise InvalidInputError(f"{self.name}.target: 'top' (the top-k target sweep) needs optimizer apgd")
        if self.optimizer == "square":
            if self.defense_aware_kind is not None:
                raise InvalidInputError(f"{self.name}: Square queries the defended model itself; it takes no BPDA/AA")
            if self.targeted:
                raise InvalidInputError(f"{self.name}.targeted: the Square attack here is untargeted")
            if not self.random_init:
                raise InvalidInputError(f"{self.name}.random_init: Square always starts from random stripes")
        check_eps(self.step_size, f"{self.name}.step_size", upper=255.0)
        check_positive_int(self.steps, f"{self.name}.steps")
        if self.norm not in NORMS:
            raise InvalidInputError(f"{self.name}.norm: expected one of {NORMS}, got {self.norm!r}")
        if self.momentum is not None and not self.momentum >= 0:
            raise InvalidInputError(f"{self.name}.momentum: expected >= 0, got {self.momentum!r}")
        LOSSES.get(self.loss)
        if self.target not in TARGET_MODES and not self.target.startswith("class:"):
            raise InvalidInputError(f"{self.name}.target: expected one of {TARGET_MODES} or 'class:<k>'")
        if self.adaptive not in (None, *ADAPTIVE_KINDS):
            raise InvalidInputError(f"{self.name}.adaptive: expected None or one of {ADAPTIVE_KINDS}")
        check_positive_int(self.eot, f"{self.name}.eot")
        if isinstance(self.lambda_e, bool) or not isinstance(self.lambda_e, (int, float)):
            raise InvalidInputError(f"{self.name}.lambda_e: expected a number >= 0, got {self.lambda_e!r}")
        if not 0 <= self.lambda_e < float("inf"):
            raise InvalidInputError(f"{self.name}.lambda_e: expected a finite value >= 0, got {self.lambda_e!r}")
        if self.eot != 1 and self.adaptive != "bpda":
            raise InvalidInputError(f"{self.name}.eot: only BPDA averages over the defense's randomness")
        if self.lambda_e != 0 and self.adaptive != "aa":
            raise InvalidInputError(f"{self.name}.lambda_e: only the adaptive attack 'aa' has an equivariance term")

    @property
    def defense_aware_kind(self) -> str | None:
        return self.adaptive

    @property
    def defense_aware(self) -> bool:
        """True when the adversarial images depend on the defense (its cache key must include the defense): BPDA,
        AA, and Square, which queries the defended model's scores."""
        return self.adaptive is not None or self.optimizer == "square"

    @property
    def gradient_free(self) -> bool:
        return self.optimizer == "square"

    def params(self) -> dict[str, Any]:
        """Canonical parameters (for cache keys, seeds and results tables). A projected-gradient attack leaves out the
        fields only APGD and Square read (they are at their defaults there): its identity, and so its seeds and its
        numbers, stay what they were before those optimisers existed."""
        p = dataclasses.asdict(self)
        if self.optimizer == "pgd":
            for name in _NEWER_FIELDS:
                p.pop(name)
        return p

    def run_apgd(self, loss_fn: LossFn, x: torch.Tensor, seeds: list[int], **options: Any) -> APGDResult:
        """APGD with this attack's budget and schedule (``options``: ``restart_offset``, ``active``)."""
        return apgd(
            loss_fn,
            x,
            eps=self.eps / 255.0,
            steps=self.steps,
            norm=self.norm,
            n_restarts=self.n_restarts,
            rho=self.rho,
            seeds=seeds,
            **options,
        )

    def perturb(self, x: torch.Tensor, loss_fn: LossFn, seeds: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        """Run the gradient optimiser on ``loss_fn`` (Square is run by :func:`run_attack`: it needs scores)."""
        if self.optimizer == "apgd":
            return self.run_apgd(loss_fn, x, as_seed_list(seeds, x.shape[0])).x_adv
        if self.optimizer != "pgd":
            raise InvalidInputError(f"{self.name}: perturb runs gradient optimisers, not {self.optimizer!r}")
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


def truth_for(attack: Attack, y: Any) -> dict[str, Any]:
    """The targeted DLR loss compares the target with the ground truth, so it is given both."""
    return {"true_labels": y} if attack.targeted and attack.loss == "dlr" else {}


def through_defense(
    attack: Attack, loss_fn: LossFn, adapter: TaskAdapter, seeds: list[int], defense: Defense | None
) -> LossFn:
    """Wrap the task loss with the defense for BPDA (straight through it) and AA (its objective)."""
    if attack.adaptive is None:
        return loss_fn
    if defense is None:
        raise InvalidInputError(f"attack {attack.name!r} is defense-aware: pass the defense it attacks")
    if attack.adaptive == "bpda":
        return bpda_loss(loss_fn, defense, adapter, seeds, attack.eot)
    return adaptive_loss(loss_fn, defense, adapter, attack.lambda_e, attack.fallback_views)


# What a config may set on a registered attack (``name`` and ``adaptive`` come with the registration).
ATTACK_PARAMS = frozenset(f.name for f in dataclasses.fields(Attack)) - {"name", "adaptive"}


def attack_factory(name: str, **defaults: Any) -> Callable[..., Attack]:
    """The registered factory of attack ``name``: ``Attack(name, **defaults, **params)`` with the step-size rules
    below. It takes ``**params`` and declares them in ``accepted``, which ``Registry.build`` checks (a typo must not
    surface as a bare TypeError from the dataclass)."""

    def build(**params: Any) -> Attack:
        merged = {**defaults, **params}
        # FGSM steps once by eps unless told otherwise; applied here so ATTACKS.build and build_attack agree.
        if name == "fgsm" and "eps" in params and "step_size" not in params:
            merged["step_size"] = params["eps"]
        optimizer = merged.get("optimizer", "pgd")
        if optimizer != "pgd" and "step_size" in params:
            raise InvalidInputError(
                f"{name}.step_size: the {optimizer} optimizer sets its own step size; remove step_size, or set "
                "optimizer: pgd to use it"
            )
        if optimizer != "pgd" and "step_size" not in params:
            merged.pop("step_size", None)
        if optimizer == "pgd" and merged.get("target") == "top" and "target" not in params:
            merged.pop("target")
        return Attack(name=name, **merged)

    build.__name__ = f"build_{name}"
    build.accepted = ATTACK_PARAMS  # type: ignore[attr-defined]
    return build
