"""equicore: the pure-PyTorch engine of equirobust (transforms, losses, attacks, defenses, metrics, models,
datasets). No orchestration or storage imports here: everything is usable from a notebook or a test.

Every built-in entry is registered in the registries (``equicore.registry``), listed by kind in :data:`REGISTRIES`;
the first lookup in any registry imports them (:mod:`equicore.builtins`), so importing the package alone does not
import torch. Every entry has a code identity, ``REGISTRIES[kind].code_version(name)``.
"""

from __future__ import annotations

from typing import Any

from equicore.registry import set_builtins_loader

__version__ = "0.1.0"


def _load_builtins() -> None:
    from equicore import builtins  # noqa: F401  (registrations)


set_builtins_loader(_load_builtins)

_LAZY = (
    "ADAPTERS",
    "ATTACKS",
    "DATASETS",
    "DEFENSES",
    "LOSSES",
    "METRICS",
    "MODELS",
    "OBJECTIVES",
    "REGISTRIES",
    "STEP_SCHEDULES",
    "TRANSFORMS",
    "VIEW_SETS",
)


def __getattr__(name: str) -> Any:
    """The registries, resolved on first access (PEP 562): that imports torch and every registration."""
    if name not in _LAZY:
        raise AttributeError(f"module 'equicore' has no attribute {name!r}")
    from equicore import builtins  # noqa: F401  (registrations)
    from equicore.adapters import ADAPTERS
    from equicore.defenses.schedules import STEP_SCHEDULES
    from equicore.equivariance import OBJECTIVES
    from equicore.registry import ATTACKS, DATASETS, DEFENSES, LOSSES, METRICS, MODELS, TRANSFORMS
    from equicore.transforms import VIEW_SETS

    # Every registry of the engine, by the plural a config or ``equi list`` uses.
    registries = {
        "adapters": ADAPTERS,
        "attacks": ATTACKS,
        "datasets": DATASETS,
        "defenses": DEFENSES,
        "losses": LOSSES,
        "metrics": METRICS,
        "models": MODELS,
        "objectives": OBJECTIVES,
        "schedules": STEP_SCHEDULES,
        "transforms": TRANSFORMS,
        "views": VIEW_SETS,
    }
    values = {
        "ADAPTERS": ADAPTERS,
        "ATTACKS": ATTACKS,
        "DATASETS": DATASETS,
        "DEFENSES": DEFENSES,
        "LOSSES": LOSSES,
        "METRICS": METRICS,
        "MODELS": MODELS,
        "OBJECTIVES": OBJECTIVES,
        "REGISTRIES": registries,
        "STEP_SCHEDULES": STEP_SCHEDULES,
        "TRANSFORMS": TRANSFORMS,
        "VIEW_SETS": VIEW_SETS,
    }
    globals().update(values)
    return values[name]


__all__ = [*_LAZY, "__version__"]
