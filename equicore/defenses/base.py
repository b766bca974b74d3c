"""Defenses: ``purify(adapter, x, seeds) -> x'``; the prediction is ``adapter.predict(x')``."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from equicore.adapters import TaskAdapter


class Defense(ABC):
    """``randomized`` and ``optimizes_at_test_time`` drive the gradient-masking checks: such defenses must be
    evaluated with BPDA (and EOT when randomized) and the defense-aware adaptive attack."""

    name: str = "defense"
    randomized: bool = False
    optimizes_at_test_time: bool = False

    @abstractmethod
    def purify(self, adapter: TaskAdapter, x: torch.Tensor, seeds: Sequence[int] | torch.Tensor | None = None):
        """Return x' (detached, in [0,1])."""

    def params(self) -> dict[str, Any]:
        if dataclasses.is_dataclass(self):
            return {"name": self.name, **dataclasses.asdict(self)}
        return {"name": self.name}

    def with_attack_eps(self, eps: float) -> Defense:
        """Resolve budgets given relative to the attack's eps (e.g. eps_v = 1.5 * eps). Default: unchanged."""
        return self
