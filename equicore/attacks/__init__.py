"""Attacks: the projected-gradient loop, APGD and Square, losses passed in, registered step rules.

- ``attack``: :class:`Attack` (threat model, step rules), targets, the BPDA/AA wrapping of the loss;
- ``run``: :func:`run_attack`; ``loop``, ``apgd``, ``apgd_t``, ``square``: the optimisers;
- ``losses``, ``dense_losses``: the registered losses; ``adaptive``: BPDA and AA;
- ``specs``: the registered attacks and the modules each one runs (:func:`attack_code_version`).
"""

from equicore.attacks import dense_losses  # noqa: F401  (registers the SEA per-pixel losses)
from equicore.attacks.apgd import APGDResult, apgd
from equicore.attacks.attack import Attack, AttackResult, make_targets
from equicore.attacks.loop import project, projected_gradient
from equicore.attacks.losses import BoundLoss, build_loss, cross_entropy_loss, cw_margin_loss, dlr_loss, houdini_loss
from equicore.attacks.run import run_attack
from equicore.attacks.specs import attack_code_version, attack_modules, build_attack
from equicore.attacks.square import SquareResult, square_attack

__all__ = [
    "APGDResult",
    "Attack",
    "AttackResult",
    "BoundLoss",
    "apgd",
    "attack_code_version",
    "attack_modules",
    "build_attack",
    "build_loss",
    "cross_entropy_loss",
    "cw_margin_loss",
    "dlr_loss",
    "houdini_loss",
    "make_targets",
    "project",
    "projected_gradient",
    "run_attack",
    "square_attack",
    "SquareResult",
]
