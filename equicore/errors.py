"""Error types with messages that name the offending field, tensor or path."""

from __future__ import annotations


class EquirobustError(Exception):
    """Base class: every error equirobust raises on bad input derives from it."""


class UnknownNameError(EquirobustError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RegistrationError(EquirobustError, TypeError, ValueError):
    """A registry entry that is not what its registry holds (wrong base class, not callable, a duplicate name), or
    a built entry of the wrong type. A programming error, raised when the entry is registered or built."""


class InvalidInputError(EquirobustError, ValueError):
    """A tensor, parameter or file does not satisfy what the function expects."""


class CheckpointError(EquirobustError, ValueError):
    """A checkpoint is missing, unreadable, unsafe or belongs to another architecture."""


class DatasetError(EquirobustError, ValueError):
    """A dataset root is missing or has the wrong layout, or a file cannot be decoded."""
