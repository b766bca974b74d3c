"""Step-size schedules of the optimising defenses: the factor on ``eta`` at each of Algorithm 1's steps.

A config names one as ``schedule: cosine`` or with parameters, ``schedule: {name: step, every: 5, gamma: 0.5}``.
``constant`` (factor 1 at every step) is the paper's and the default. Each entry is a small frozen dataclass with
``factor(t, steps)``; :func:`build_schedule` turns a config value into one and :func:`schedule_spec` back into the
canonical value recorded in the defense's parameters (every field spelled out, so ``{name: step, every: 5}`` and
``{name: step, every: 5, gamma: 0.5}`` are the same run).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from equicore.errors import InvalidInputError, UnknownNameError
from equicore.registry import Registry

DEFAULT_SCHEDULE = "constant"


class StepSchedule:
    """The factor on the step size at step ``t`` of ``steps`` (t = 0..steps-1); 1 at t = 0, positive, never rising."""

    name: ClassVar[str] = "schedule"

    def factor(self, t: int, steps: int) -> float:
        raise NotImplementedError


# Name -> a StepSchedule class; ``build_schedule`` builds one from a config value.
STEP_SCHEDULES: Registry[StepSchedule] = Registry("step-size schedule", base_cls=StepSchedule)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInputError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


@STEP_SCHEDULES.register("constant", summary="eta at every step (the paper)")
@dataclass(frozen=True)
class ConstantSchedule(StepSchedule):
    name: ClassVar[str] = "constant"

    def factor(self, t: int, steps: int) -> float:
        return 1.0


@STEP_SCHEDULES.register("cosine", summary="eta decays along a half cosine towards final x eta")
@dataclass(frozen=True)
class CosineSchedule(StepSchedule):
    """``final + (1 - final) (1 + cos(pi t / steps)) / 2`` (PyTorch's CosineAnnealingLR with T_max = steps): the last
    step is small but not zero, so no step is wasted. ``final`` in [0, 1] is the fraction of eta it decays towards."""

    final: float = 0.0
    name: ClassVar[str] = "cosine"

    def __post_init__(self) -> None:
        final = _number(self.final, "schedule.final")
        if not 0.0 <= final <= 1.0:
            raise InvalidInputError(f"schedule.final: expected 0 <= final <= 1 (a fraction of eta), got {self.final!r}")

    def factor(self, t: int, steps: int) -> float:
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * t / steps))


@STEP_SCHEDULES.register("step", summary="eta x gamma every `every` steps")
@dataclass(frozen=True)
class StepDecaySchedule(StepSchedule):
    """``gamma ** (t // every)`` (PyTorch's StepLR): eta, then gamma x eta after ``every`` steps, and so on."""

    every: int = 5
    gamma: float = 0.5
    name: ClassVar[str] = "step"

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise InvalidInputError(f"schedule.every: expected an integer >= 1 (steps), got {self.every!r}")
        gamma = _number(self.gamma, "schedule.gamma")
        if not 0.0 < gamma <= 1.0:
            raise InvalidInputError(f"schedule.gamma: expected 0 < gamma <= 1 (a decay factor), got {self.gamma!r}")

    def factor(self, t: int, steps: int) -> float:
        return float(self.gamma) ** (t // self.every)


def build_schedule(spec: Any, who: str = "defense") -> StepSchedule:
    """A schedule from its config value: a registered name, or a mapping with ``name`` and the schedule's parameters.
    Errors are one line naming ``<who>.schedule``."""
    field = f"{who}.schedule"
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise InvalidInputError(
            f"{field}: expected a schedule name or a mapping with 'name' (e.g. {{name: step, every: 5}}), got {spec!r}"
        )
    try:
        return STEP_SCHEDULES.build(name, **params)
    except UnknownNameError as e:
        raise InvalidInputError(f"{field}: {e}") from None
    except InvalidInputError as e:
        # Parameter errors name "schedule.x" (or the registry's "got unknown parameter(s)"): prefix the defense.
        message = str(e)
        if message.startswith("schedule."):
            raise InvalidInputError(f"{who}.{message}") from None
        raise InvalidInputError(f"{field}: {message}") from None


def schedule_spec(schedule: StepSchedule) -> str | dict[str, Any]:
    """The canonical config value of a built schedule: its bare name when it has no parameters, else a mapping with
    every parameter (defaults included)."""
    fields = dataclasses.asdict(schedule) if dataclasses.is_dataclass(schedule) else {}
    return {"name": schedule.name, **fields} if fields else schedule.name
