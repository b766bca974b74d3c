"""The choice ``equi tune`` makes, as pure functions of per-candidate numbers (no I/O).

- :func:`pareto_front`: the candidates no other candidate beats on both clean and robust metric (ties kept).
- :func:`feasible`: clean metric >= the baseline's (the defense as configured, usually the paper's settings) minus
  ``clean_tolerance`` points.
- :func:`rank`: feasible candidates by robust metric (screen), then clean, then candidate number: the order in which
  points are confirmed with the strong attacks.
- :func:`choose`: among the confirmed candidates, the feasible one with the highest CONFIRMED robust metric (ties:
  higher clean, then the lower candidate number, so the baseline wins a tie). The baseline is always feasible, so
  there is always a choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

PERCENT_METRICS = ("accuracy", "miou", "mask_ap")  # stored as fractions, tolerances given in points


def tolerance_units(metric: str, points: float) -> float:
    """``clean_tolerance`` (points) in the stored unit of ``metric`` (fractions for percent metrics)."""
    return points / 100.0 if metric in PERCENT_METRICS else points


def _num(v: Any) -> float:
    return float("-inf") if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """``[on_front]`` for (clean, robust) points, both maximised: a point is off the front when another is at least
    as good on both and better on one."""
    out = []
    for i, (c, r) in enumerate(points):
        dominated = any((c2 >= c and r2 >= r) and (c2 > c or r2 > r) for j, (c2, r2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def feasible(clean: float, baseline_clean: float, tolerance: float) -> bool:
    return _num(clean) >= _num(baseline_clean) - tolerance - 1e-12


def rank(rows: Sequence[Mapping[str, Any]], robust_key: str = "robust_screen") -> list[int]:
    """Candidate numbers of the feasible rows, best first (robust, then clean, then lower number)."""
    ok = [r for r in rows if r["feasible"]]
    ok.sort(key=lambda r: (-_num(r[robust_key]), -_num(r["clean"]), r["candidate"]))
    return [int(r["candidate"]) for r in ok]


def choose(rows: Sequence[Mapping[str, Any]], robust_key: str) -> int:
    """The chosen candidate number among rows with a value under ``robust_key`` (see the module docstring)."""
    scored = [r for r in rows if r.get(robust_key) is not None and not math.isnan(float(r[robust_key]))]
    best = rank(scored, robust_key)
    if not best:
        raise ValueError("no feasible candidate was scored")
    return best[0]
