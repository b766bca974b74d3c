"""The error of a run configuration that cannot be used (its own module: the config readers and checks of
:mod:`tasks.config_yaml` and :mod:`tasks.config_checks` raise it, and :mod:`tasks.config` imports them)."""

from __future__ import annotations

from equicore.errors import EquirobustError


class ConfigError(EquirobustError, ValueError):
    """A run configuration that cannot be used; the message names the field."""
