"""Moved to :mod:`equicore.adapters.instance` (the task adapters live together); this name stays for imports."""

from equicore.adapters.instance import FEATURE_LEVELS, LOSS_KEYS, InstanceAdapter, InstanceTargets

__all__ = ["FEATURE_LEVELS", "LOSS_KEYS", "InstanceAdapter", "InstanceTargets"]
