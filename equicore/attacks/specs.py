"""Registered attacks: an optimiser (the projected-gradient loop, APGD, or the score-based Square attack), its step
rules and the name of its loss.

``ATTACKS.build("pgd", eps=8, steps=20)`` returns an :class:`Attack`; :func:`run_attack` builds the loss for the
adapter and labels (outside the attack), picks targets for targeted attacks, and runs the optimiser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from equicore.adapters import TaskAdapter
from equicore.attacks.adaptive import adaptive_loss, bpda_loss
from equicore.attacks.apgd import APGDResult, apgd
from equicore.attacks.loop import NORMS, LossFn, projected_gradient
from equicore.attacks.losses import build_loss
from equicore.attacks.square import margin_loss, square_attack
from equicore.defenses.base import Defense
from equicore.errors import InvalidInputError
from equicore.registry import ATTACKS, LOSSES
from equicore.seeding import as_seed_list, derive_seed
from equicore.validation import check_batch_match, check_eps, check_images

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
            value = getattr(self, param)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{self.name}.{param}: expected an integer >= 1, got {value!r}")
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
    seed_list = as_seed_list(seeds, x.shape[0])
    if attack.optimizer == "square":
        return AttackResult(_square(attack, adapter, x, y, seed_list, defense), None)
    if attack.targeted and attack.target == "top":
        if loss_fn is not None:
            raise InvalidInputError(f"{attack.name}: the top-k target sweep builds its own losses")
        return AttackResult(_top_k_targets(attack, adapter, x, y, seed_list, defense), None)
    targets = make_targets(adapter, x, y, attack.target) if attack.targeted else None
    if loss_fn is None:
        labels = targets if targets is not None else y
        params = {**attack.loss_params, **_truth_for(attack, y)}
        loss_fn = build_loss(attack.loss, adapter, labels, targeted=attack.targeted, **params)
    loss_fn = _through_defense(attack, loss_fn, adapter, seed_list, defense)
    return AttackResult(attack.perturb(x, loss_fn, seed_list), targets)


def _truth_for(attack: Attack, y: Any) -> dict[str, Any]:
    """The targeted DLR loss compares the target with the ground truth, so it is given both."""
    return {"true_labels": y} if attack.targeted and attack.loss == "dlr" else {}


def _through_defense(
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


def _top_k_targets(
    attack: Attack, adapter: TaskAdapter, x: torch.Tensor, y: torch.Tensor, seeds: list[int], defense: Defense | None
) -> torch.Tensor:
    """APGD-T (AutoAttack): one run per target rank k = 2..n_target_classes+1 (the k-th highest clean logit), each
    only on samples not yet fooled. Per pixel for segmentation (the k-th class of each pixel)."""
    with torch.no_grad():
        ranked = adapter.logits(x).argsort(dim=1, descending=True)
    n_classes = ranked.shape[1]
    out = x.detach().clone()
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    best = torch.full((x.shape[0],), float("-inf"), device=x.device)
    for rank in range(1, min(attack.n_target_classes, n_classes - 1) + 1):
        targets = ranked[:, rank]
        ignore = getattr(adapter, "ignore_index", None)
        if ignore is not None and y.ndim > 1:
            targets = torch.where(y == ignore, y, targets)
        params = {**attack.loss_params, **_truth_for(attack, y)}
        task_loss = build_loss(attack.loss, adapter, targets, targeted=True, **params)
        loss_fn = _through_defense(attack, task_loss, adapter, seeds, defense)
        res = attack.run_apgd(loss_fn, x, seeds, restart_offset=rank * attack.n_restarts, active=active)
        ran = active.clone()
        if res.fooled is not None:
            newly = res.fooled & ran
            keep = newly | (ran & ~res.fooled & (res.loss > best))
            active &= ~res.fooled
        else:
            keep = ran & (res.loss > best)
        out[keep] = res.x_adv[keep]
        best = torch.where(keep, res.loss, best)
        if not active.any():
            break
    return out


def _square(
    attack: Attack, adapter: TaskAdapter, x: torch.Tensor, y: Any, seeds: list[int], defense: Defense | None
) -> torch.Tensor:
    """Square on the scores of the defended model (the defense, when given, runs inside every query; a randomised
    defense is drawn afresh per query, from the image's own seed)."""
    if adapter.task != "classification" or not isinstance(y, torch.Tensor) or y.ndim != 1:
        raise InvalidInputError(f"{attack.name}: the Square attack is defined for classification, not {adapter.task}")
    calls = [0]

    def defended_logits(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if defense is None:
            return adapter.logits(xs)
        call = calls[0]
        calls[0] += 1
        draw = [derive_seed(seeds[i], "square-query", call) for i in idx.tolist()]
        with torch.enable_grad():  # an optimising defense differentiates its own objective
            purified = defense.purify(adapter, xs, draw)
        return adapter.logits(purified)

    return square_attack(
        margin_loss(defended_logits, y, with_indices=True),
        x,
        eps=attack.eps,
        n_queries=attack.n_queries,
        p_init=attack.p_init,
        norm=attack.norm,
        seeds=seeds,
    ).x_adv


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
    build.accepted = _ACCEPTED  # type: ignore[attr-defined]
    return build


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
    ATTACKS.register(
        _name,
        loss=_defaults.get("loss", "ce"),
        defense_aware=_defaults.get("adaptive") is not None or _defaults.get("optimizer") == "square",
        optimizer=_defaults.get("optimizer", "pgd"),
        **({"tasks": _TASKS[_name]} if _name in _TASKS else {}),
    )(_factory(_name, **_defaults))


def build_attack(name: str, **params: Any) -> Attack:
    """``fgsm`` steps once by eps unless told otherwise (the registered factories validate and apply that)."""
    return ATTACKS.build(name, **params)
