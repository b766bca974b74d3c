"""Attacks: the projected-gradient loop, APGD and Square, losses passed in, registered step rules."""

from equicore.attacks import dense_losses  # noqa: F401  (registers the SEA per-pixel losses)
from equicore.attacks.apgd import APGDResult, apgd
from equicore.attacks.loop import project, projected_gradient
from equicore.attacks.losses import BoundLoss, build_loss, cross_entropy_loss, cw_margin_loss, dlr_loss, houdini_loss
from equicore.attacks.specs import Attack, AttackResult, build_attack, make_targets, run_attack
from equicore.attacks.square import SquareResult, square_attack

__all__ = [
    "APGDResult",
    "Attack",
    "AttackResult",
    "BoundLoss",
    "apgd",
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
