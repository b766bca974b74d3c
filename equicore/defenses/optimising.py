"""Test-time purification by maximising a per-sample objective (Algorithm 1 of the paper), and the base class of
every defense that runs it.

``x' += eta * sign(normalize(grad L(x')) + N(0, (T-1-t)/T))`` for t = 0..T-1, projecting into the eps_v-ball
around the input and into [0, 1]. ``OptimizingDefense`` holds what every such defense shares (budgets, steps, noise,
per-sample seeds, optimiser options); its subclasses give the objective: the equivariance and invariance defenses
(``defenses/consistency.py``) and the self-supervised baselines (``defenses/selfsup.py``).

Optimiser options (issue #19; the defaults are Algorithm 1, bit for bit): the step rule (``sign``; ``normalized``:
the per-sample normalised direction itself; ``adam`` on the perturbation), a step-size schedule
(``defenses/schedules.py``), a factor on the annealed noise, and per-sample early stopping / best-iterate return.
With sign steps of eta = 2 eps_v every step lands on a corner of the eps_v-ball; the other rules can stay inside it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from equicore.adapters import TaskAdapter
from equicore.defenses.base import Defense
from equicore.defenses.budget import check_budget, require_eps_v, resolve_eps_v
from equicore.defenses.schedules import DEFAULT_SCHEDULE, StepSchedule, build_schedule, schedule_spec
from equicore.errors import InvalidInputError
from equicore.seeding import as_seed_list, per_sample_draw
from equicore.validation import FiniteGuard, check_finite, check_images, check_positive_int

STEP_RULES = ("sign", "normalized", "adam")
# How iterates are compared for early stopping and best-iterate return (see ``optimize_objective``).
BEST_BY = ("fixed", "step")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# The optimiser options and their defaults (Algorithm 1). ``params()`` leaves out an option at its default, so the
# parameters (and the cache and result keys made from them) of every config written before the options existed stay
# exactly as they were.
OPTIMIZER_DEFAULTS: dict[str, Any] = {
    "step_rule": "sign",
    "schedule": DEFAULT_SCHEDULE,
    "noise_scale": 1.0,
    "patience": None,
    "min_delta": 0.0,
    "keep_best": False,
    "best_by": "fixed",
}


def normalize_per_sample(grad: torch.Tensor, how: str = "rms") -> torch.Tensor:
    """Scale each sample's gradient to unit RMS ("rms") or unit L2 norm ("l2").

    Per sample, not over the batch: a batch-wide norm makes each image's step depend on its batch-mates, and with
    unit-L2 scaling over a whole batch the elements are ~1/sqrt(numel) so the N(0, 1) noise swamps the gradient. Unit
    RMS keeps gradient entries O(1), comparable with the annealed noise, as Algorithm 1 intends.
    """
    flat = grad.flatten(1).norm(dim=1)
    if how == "rms":
        flat = flat / math.sqrt(grad[0].numel())
    elif how != "l2":
        raise InvalidInputError(f"grad_norm: expected 'rms' or 'l2', got {how!r}")
    return grad / (flat.view(-1, *([1] * (grad.ndim - 1))) + 1e-12)


def noise_std(t: int, steps: int) -> float:
    """Algorithm 1 anneals the noise variance (T-1-t)/T linearly to zero at the last step."""
    return math.sqrt(max(0.0, (steps - 1 - t) / steps))


def check_choice(value: object, choices: Sequence[str], field: str, what: str) -> str:
    """``value`` if it is one of ``choices``, else one line naming ``field``, with a close match."""
    if isinstance(value, str) and value in choices:
        return value
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise InvalidInputError(f"{field}: unknown {what} {value!r}{hint} (known: {', '.join(sorted(choices))})")


class _BestIterate:
    """Per sample: the best objective value seen and its iterate; with ``patience``, how many observations in a row
    did not beat the last significant improvement by more than ``min_delta`` (the sample stops at ``patience``).

    The best iterate is updated on any improvement, however small, so the iterate returned is always the best one
    observed; ``min_delta`` only decides when a sample stops.
    """

    def __init__(self, x: torch.Tensor, patience: int | None, min_delta: float) -> None:
        b = x.shape[0]
        self.best_x = x.detach().clone()
        self.best = torch.full((b,), -math.inf, dtype=x.dtype, device=x.device)
        self.ref = self.best.clone()
        self.stale = torch.zeros(b, dtype=torch.long, device=x.device)
        self.patience, self.min_delta = patience, min_delta

    def observe(self, value: torch.Tensor, xa: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Record the objective ``value`` [n] of iterates ``xa`` of samples ``idx``; True where a sample goes on."""
        value = check_finite(value.detach().to(self.best.dtype), "defense objective")
        better = value > self.best[idx]
        self.best[idx] = torch.where(better, value, self.best[idx])
        self.best_x[idx[better]] = xa.detach()[better]
        if self.patience is None:
            return torch.ones_like(better)
        significant = value > self.ref[idx] + self.min_delta
        self.ref[idx] = torch.where(significant, value, self.ref[idx])
        self.stale[idx] = torch.where(significant, torch.zeros_like(self.stale[idx]), self.stale[idx] + 1)
        return self.stale[idx] < self.patience


def optimize_objective(
    score_fn: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    *,
    eps_v: float,
    eta: float,
    steps: int,
    seeds: Sequence[int],
    noise: bool = True,
    random_start: bool = False,
    grad_norm: str = "rms",
    step_rule: str = "sign",
    schedule: StepSchedule | None = None,
    noise_scale: float = 1.0,
    patience: int | None = None,
    min_delta: float = 0.0,
    keep_best: bool = False,
    best_by: str = "fixed",
    objective_varies: bool = True,
) -> torch.Tensor:
    """Maximise ``score_fn(x', t) -> [B]`` by Algorithm 1's noisy steps; eps_v and eta in [0,1] units.

    ``step_rule``: ``sign`` (Algorithm 1), ``normalized`` (the direction rescaled per sample by ``grad_norm``: unit
    RMS, so eta is the RMS step per pixel, or unit L2, so eta is the step's L2 length) or ``adam`` (Adam on the
    perturbation, per-sample state and bias correction, learning rate eta; the noisy direction is its gradient).
    ``schedule``: the factor on eta per step (None: constant). ``noise_scale``: a factor on the annealed noise std.

    ``patience``: a sample stops when its objective has not risen by more than ``min_delta`` for ``patience``
    iterates in a row, and keeps its best iterate; ``keep_best`` returns each sample's best iterate without stopping.
    Either compares iterates by ``best_by``: ``fixed`` evaluates every iterate (the last one included) under one
    objective, step 0's, so values are comparable even when the objective redraws its views every step; that costs
    one forward pass without gradient per step when ``objective_varies`` (none otherwise: the step's own value is
    that one) plus one for the last iterate. ``step`` reuses the value each step computes anyway (free, but under
    views redrawn per step the values of different steps come from different draws); the last iterate is evaluated
    under the last step's objective. A stopped sample leaves the batch, so later steps cost less.
    """
    check_choice(step_rule, STEP_RULES, "step_rule", "step rule")
    check_choice(best_by, BEST_BY, "best_by", "best_by")
    x0 = x.detach()
    xp = x0
    if random_start and eps_v > 0:
        u = per_sample_draw("uniform", x.shape[1:], seeds, "defense-start", device=x.device, dtype=x.dtype)
        xp = (x0 + (2 * u - 1) * eps_v).clamp(0, 1)
    tracker = _BestIterate(xp, patience, min_delta) if patience is not None or keep_best else None
    fixed_pass = tracker is not None and best_by == "fixed" and objective_varies
    active = torch.arange(x.shape[0], device=x.device)  # the samples still optimising
    # The projection's bounds, once: clamping into [max(x0 - eps, 0), min(x0 + eps, 1)] is exactly the eps-ball
    # projection followed by the [0, 1] clamp (comparisons only; x0 lies in [0, 1]).
    lo_a, hi_a = (x0 - eps_v).clamp(min=0), (x0 + eps_v).clamp(max=1)
    xa, seeds_a = xp, list(seeds)
    moments: tuple[torch.Tensor, torch.Tensor] | None = None  # Adam's (m, v) of the active samples

    def narrow(go: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nonlocal active, lo_a, hi_a, xa, seeds_a, moments
        if bool(go.all()):
            return extra
        keep = go.nonzero().flatten()
        active, lo_a, hi_a, xa = active[keep], lo_a[keep], hi_a[keep], xa[keep]
        seeds_a = [seeds_a[i] for i in keep.tolist()]
        if moments is not None:
            moments = (moments[0][keep], moments[1][keep])
        return tuple(e[keep] for e in extra)

    completed = True
    finite = FiniteGuard("defense gradient")
    for t in range(steps):
        if fixed_pass and t > 0:
            with torch.no_grad():
                narrow(tracker.observe(score_fn(xa, 0), xa, active))
            if active.numel() == 0:
                completed = False
                break
        xa = xa.detach().requires_grad_(True)
        score = score_fn(xa, t)
        (grad,) = torch.autograd.grad(score.sum(), xa)
        xa = xa.detach()
        finite.watch(grad)
        if tracker is not None and not (fixed_pass and t > 0):
            (grad,) = narrow(tracker.observe(score, xa, active), grad)
            if active.numel() == 0:
                completed = False
                break
        direction = normalize_per_sample(grad, grad_norm)
        if noise:
            sigma = noise_std(t, steps)
            if noise_scale != 1.0:
                sigma = sigma * noise_scale
            if sigma > 0:
                z = per_sample_draw(
                    "normal", x.shape[1:], seeds_a, ("defense-noise", t), device=x.device, dtype=x.dtype
                )
                direction = direction + sigma * z
        step_eta = eta if schedule is None else eta * schedule.factor(t, steps)
        if step_rule == "sign":
            update = direction.sign()
        elif step_rule == "normalized":
            update = normalize_per_sample(direction, grad_norm)
        else:
            update, moments = _adam_update(direction, moments, t + 1)
        xa = xa + step_eta * update
        xa = torch.clamp(xa, lo_a, hi_a)
        xp = xa if xa.shape[0] == xp.shape[0] else xp.index_copy(0, active, xa)
    finite.check()
    if tracker is None:
        return xp.detach()
    if completed:  # the last iterate, under the objective the others were compared by
        with torch.no_grad():
            tracker.observe(score_fn(xa, 0 if best_by == "fixed" else steps - 1), xa, active)
    return tracker.best_x


def _adam_update(
    grad: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor] | None, k: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Adam's bias-corrected step direction at step ``k`` (1-based) for ascent on ``grad``; elementwise, so per
    sample."""
    b1, b2 = ADAM_BETAS
    m, v = moments if moments is not None else (torch.zeros_like(grad), torch.zeros_like(grad))
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    m_hat, v_hat = m / (1 - b1**k), v / (1 - b2**k)
    return m_hat / (v_hat.sqrt() + ADAM_EPS), (m, v)


@dataclass(frozen=True)
class OptimizingDefense(Defense):
    """Parameters and ``purify`` shared by every defense that runs Algorithm 1 on a per-sample ``score``.

    Budgets in /255 units: ``eps_v`` None means ``eps_v_factor`` x the attack's eps (paper: 1.5); ``eta`` None means
    2 x eps_v (paper). Subclasses implement ``score(adapter, x, step) -> [B]``, the objective being MAXIMISED
    (differentiable in x); ``prepare(adapter)`` runs once per ``purify`` before the first step (e.g. loading a head).
    The optimiser options (``step_rule`` ... ``best_by``) are those of :func:`optimize_objective`; ``schedule`` is a
    schedule name or ``{name: ..., <its parameters>}`` (``defenses/schedules.py``), kept in its canonical form.
    """

    steps: int = 20
    eps_v: float | None = None
    eps_v_factor: float = 1.5
    eta: float | None = None
    noise: bool = True
    random_start: bool = False
    grad_norm: str = "rms"
    step_rule: str = "sign"
    schedule: str | Mapping[str, Any] = DEFAULT_SCHEDULE
    noise_scale: float = 1.0
    patience: int | None = None
    min_delta: float = 0.0
    keep_best: bool = False
    best_by: str = "fixed"

    name = "optimizing"
    optimizes_at_test_time = True

    def __post_init__(self) -> None:
        check_positive_int(self.steps, f"{self.name}.steps")
        check_budget(self.name, self.eps_v, self.eps_v_factor, self.eta)
        if self.grad_norm not in ("rms", "l2"):
            raise InvalidInputError(f"{self.name}.grad_norm: expected 'rms' or 'l2', got {self.grad_norm!r}")
        self._check_optimizer_options()

    def _check_optimizer_options(self) -> None:
        who = self.name
        check_choice(self.step_rule, STEP_RULES, f"{who}.step_rule", "step rule")
        object.__setattr__(self, "schedule", schedule_spec(build_schedule(self.schedule, who)))
        for flag in ("noise", "keep_best"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidInputError(f"{who}.{flag}: expected true or false, got {getattr(self, flag)!r}")
        scale = self.noise_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
            raise InvalidInputError(
                f"{who}.noise_scale: expected a finite number > 0, got {scale!r} (noise: false turns the noise off)"
            )
        if not self.noise and scale != 1.0:
            raise InvalidInputError(f"{who}.noise_scale: {scale!r} scales the annealed noise, but noise is false")
        object.__setattr__(self, "noise_scale", float(scale))
        if self.patience is not None:
            check_positive_int(self.patience, f"{who}.patience")
        delta = self.min_delta
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not math.isfinite(delta) or delta < 0:
            raise InvalidInputError(f"{who}.min_delta: expected a finite number >= 0, got {delta!r}")
        if delta != 0 and self.patience is None:
            raise InvalidInputError(f"{who}.min_delta: {delta!r} applies to early stopping, but patience is not set")
        object.__setattr__(self, "min_delta", float(delta))
        check_choice(self.best_by, BEST_BY, f"{who}.best_by", "best_by")
        if self.best_by != OPTIMIZER_DEFAULTS["best_by"] and self.patience is None and not self.keep_best:
            raise InvalidInputError(
                f"{who}.best_by: {self.best_by!r} compares iterates, but neither patience nor keep_best is set"
            )

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return self.noise or self.random_start

    @property
    def objective_varies_by_step(self) -> bool:
        """Whether ``score(adapter, x, step)`` depends on ``step`` (views redrawn per step); conservative default."""
        return True

    def params(self) -> dict[str, Any]:
        p = super().params()
        for key, default in OPTIMIZER_DEFAULTS.items():
            if key in p and p[key] == default:
                del p[key]
        return p

    def objective_evaluations(self) -> int:
        """Evaluations of the objective one purification makes at most (each a pass over the image and its views):
        ``steps`` with gradient, plus, when iterates are compared, one without gradient for the last iterate and
        (``best_by: fixed`` with an objective that varies by step) one per step after the first."""
        if self.patience is None and not self.keep_best:
            return self.steps
        per_step = self.best_by == "fixed" and self.objective_varies_by_step
        return self.steps + 1 + (self.steps - 1 if per_step else 0)

    def step_schedule(self) -> StepSchedule | None:
        """The step-size schedule; None for the constant one (Algorithm 1's eta at every step)."""
        return None if self.schedule == DEFAULT_SCHEDULE else build_schedule(self.schedule, self.name)

    def with_attack_eps(self, eps: float) -> OptimizingDefense:
        return replace(self, eps_v=resolve_eps_v(self.eps_v, self.eps_v_factor, eps))

    def score(self, adapter: TaskAdapter, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Per-sample objective value ``[B]`` (differentiable in x); ``purify`` maximises it."""
        raise NotImplementedError

    def prepare(self, adapter: TaskAdapter) -> None:
        """Checks and loading that must happen before the first step (after the input checks). Default: none."""

    def purify(self, adapter: TaskAdapter, x: torch.Tensor, seeds: Sequence[int] | torch.Tensor | None = None):
        check_images(x, "defense input")
        budget = require_eps_v(self.name, self.eps_v)
        eps_v = budget / 255.0
        eta = (self.eta if self.eta is not None else 2.0 * budget) / 255.0
        if eps_v == 0:
            return x.detach()
        seed_list = as_seed_list(seeds, x.shape[0])
        self.prepare(adapter)
        return optimize_objective(
            lambda xp, t: self.score(adapter, xp, t),
            x,
            eps_v=eps_v,
            eta=eta,
            steps=self.steps,
            seeds=seed_list,
            noise=self.noise,
            random_start=self.random_start,
            grad_norm=self.grad_norm,
            step_rule=self.step_rule,
            schedule=self.step_schedule(),
            noise_scale=self.noise_scale,
            patience=self.patience,
            min_delta=self.min_delta,
            keep_best=self.keep_best,
            best_by=self.best_by,
            objective_varies=self.objective_varies_by_step,
        )
