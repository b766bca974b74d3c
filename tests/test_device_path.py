"""The GPU path without a GPU: the engine and the pipeline take their device from the run (``tasks.runtime
.pick_device``) and never name one in code, and the defense loop's finiteness check does not read a flag back from
the device every step (one read per purification there; immediate on the CPU, where reading is free)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from equicore.errors import InvalidInputError
from equicore.validation import FiniteGuard

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("equicore", "tasks", "flows", "storage", "reports", "training")


def _device_calls(path: Path) -> list[str]:
    """``x.cuda()`` / ``x.cpu()``-style hard-coded placements and ``torch.device("cuda...")`` literals in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            if not node.args and not node.keywords:  # .cuda(): torch.cuda.<fn>() are attribute calls with a name
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .cuda()")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "device":
            for arg in node.args[:1]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("cuda:"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.device({arg.value!r})")
    return found


def test_no_code_names_a_device() -> None:
    bad = [hit for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) for hit in _device_calls(p)]
    assert bad == [], "place tensors with the run's device (tasks.runtime.pick_device), not in code: " + ", ".join(bad)


def test_finite_guard_checks_at_once_on_the_cpu() -> None:
    guard = FiniteGuard("defense gradient")
    guard.watch(torch.ones(3))
    with pytest.raises(InvalidInputError, match="defense gradient: contains NaN or Inf"):
        guard.watch(torch.tensor([1.0, float("nan")]))


def test_finite_guard_deferred_reads_once_and_raises_the_same_error() -> None:
    guard = FiniteGuard("defense gradient", defer=True)
    guard.watch(torch.ones(3))
    guard.check()  # all finite so far
    guard.watch(torch.tensor([float("inf")]))  # not read yet: no host sync on an accelerator
    guard.watch(torch.ones(2))
    with pytest.raises(InvalidInputError, match="defense gradient: contains NaN or Inf"):
        guard.check()


def test_purify_with_a_deferred_guard_still_refuses_a_non_finite_gradient(monkeypatch) -> None:
    from equicore.defenses import optimising

    monkeypatch.setattr(optimising, "FiniteGuard", lambda name: FiniteGuard(name, defer=True))

    def score(x: torch.Tensor, t: int) -> torch.Tensor:
        return (x * float("nan")).flatten(1).sum(1)

    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(InvalidInputError, match="defense gradient"):
        optimising.optimize_objective(score, x, eps_v=0.1, eta=0.05, steps=3, seeds=[1, 2])
