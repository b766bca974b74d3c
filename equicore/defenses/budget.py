"""The purification budget shared by the defenses that move the input: ``eps_v`` (/255), given or resolved from the
attack's eps as ``eps_v_factor * eps`` (paper: 1.5), and an optional step size ``eta`` (/255)."""

from __future__ import annotations

from equicore.errors import InvalidInputError
from equicore.validation import check_eps


def check_budget(who: str, eps_v: float | None, eps_v_factor: float, eta: float | None = None) -> None:
    """``eps_v`` and ``eta`` (when set) are budgets in /255 units; ``eps_v_factor`` is >= 0."""
    if eps_v is not None:
        check_eps(eps_v, f"{who}.eps_v")
    if eta is not None:
        check_eps(eta, f"{who}.eta")
    if not eps_v_factor >= 0:
        raise InvalidInputError(f"{who}.eps_v_factor: expected >= 0, got {eps_v_factor!r}")


def resolve_eps_v(eps_v: float | None, factor: float, attack_eps: float) -> float:
    """``eps_v`` when given, else ``factor`` x the attack's eps."""
    return float(eps_v) if eps_v is not None else float(factor) * float(attack_eps)


def require_eps_v(who: str, eps_v: float | None) -> float:
    """The resolved ``eps_v`` a defense needs before it runs."""
    if eps_v is None:
        raise InvalidInputError(f"{who}.eps_v is unset: give eps_v or resolve it from the attack eps")
    return eps_v
