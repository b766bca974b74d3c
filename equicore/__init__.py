"""equicore: the pure-PyTorch engine of equirobust (transforms, losses, attacks, defenses, metrics, models,
datasets). No orchestration or storage imports here: everything is usable from a notebook or a test.

Importing the package registers every built-in entry in the registries (``equicore.registry``), listed by kind in
:data:`REGISTRIES`. Every entry has a code identity, ``REGISTRIES[kind].code_version(name)``.
"""

from equicore import (  # noqa: F401  (imported for their registrations)
    adapters,
    attacks,
    datasets,
    defenses,
    equivariance,
    metrics,
    models,
    transforms,
)
from equicore.adapters import ADAPTERS
from equicore.equivariance import OBJECTIVES
from equicore.registry import ATTACKS, DATASETS, DEFENSES, LOSSES, METRICS, MODELS, TRANSFORMS, Registry
from equicore.transforms import VIEW_SETS

__version__ = "0.1.0"

# Every registry of the engine, by the plural a config or ``equi list`` uses.
REGISTRIES: dict[str, Registry] = {
    "adapters": ADAPTERS,
    "attacks": ATTACKS,
    "datasets": DATASETS,
    "defenses": DEFENSES,
    "losses": LOSSES,
    "metrics": METRICS,
    "models": MODELS,
    "objectives": OBJECTIVES,
    "transforms": TRANSFORMS,
    "views": VIEW_SETS,
}

__all__ = [
    "ADAPTERS",
    "ATTACKS",
    "DATASETS",
    "DEFENSES",
    "LOSSES",
    "METRICS",
    "MODELS",
    "OBJECTIVES",
    "REGISTRIES",
    "TRANSFORMS",
    "VIEW_SETS",
    "__version__",
]
