"""The engine's built-in entries: importing this module registers every one of them.

Registries import it on their first lookup (:func:`equicore.registry.load_builtins`), so ``import equicore`` itself
stays cheap (no torch) for the read-only CLI.
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
