"""Attacks: one projected-gradient loop, losses passed in, registered step rules."""

from equicore.attacks.loop import project, projected_gradient
from equicore.attacks.losses import build_loss, cross_entropy_loss, cw_margin_loss, houdini_loss
from equicore.attacks.specs import Attack, AttackResult, build_attack, make_targets, run_attack

__all__ = [
    "Attack",
    "AttackResult",
    "build_attack",
    "build_loss",
    "cross_entropy_loss",
    "cw_margin_loss",
    "houdini_loss",
    "make_targets",
    "project",
    "projected_gradient",
    "run_attack",
]
