"""equicore: the pure-PyTorch engine of equirobust (transforms, losses, attacks, defenses, metrics, models,
datasets). No orchestration or storage imports here: everything is usable from a notebook or a test.

Importing the package registers every built-in entry in the registries (``equicore.registry``).
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
from equicore.registry import ATTACKS, DATASETS, DEFENSES, LOSSES, METRICS, MODELS, TRANSFORMS

__version__ = "0.1.0"

__all__ = ["ATTACKS", "DATASETS", "DEFENSES", "LOSSES", "METRICS", "MODELS", "TRANSFORMS", "__version__"]
