"""The optimiser options of the optimising defenses (issue #19): step rules, step-size schedules, noise scale, early
stopping and best-iterate return (``equicore/defenses/optimising.py``, ``equicore/defenses/schedules.py``).

The defaults are Algorithm 1 bit for bit (against a frozen copy of the optimiser as it was before the options) and
keep a defense's parameters, hence its cache and result keys, exactly as they were.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from equicore.defenses import build_defense
from equicore.defenses.optimising import noise_std, normalize_per_sample, optimize_objective
from equicore.defenses.schedules import STEP_SCHEDULES, build_schedule
from equicore.errors import InvalidInputError
from equicore.seeding import per_sample_draw
from equicore.validation import check_finite
from tests.models_for_tests import make_task

ATTACK_EPS = 8.0
SEEDS = [11, 22, 33, 44]


def paper_optimize_objective(
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
) -> torch.Tensor:
    """FROZEN copy of ``optimize_objective`` before the optimiser options (Algorithm 1): do not edit."""
    x0 = x.detach()
    xp = x0
    if random_start and eps_v > 0:
        u = per_sample_draw("uniform", x.shape[1:], seeds, "defense-start", device=x.device, dtype=x.dtype)
        xp = (x0 + (2 * u - 1) * eps_v).clamp(0, 1)
    for t in range(steps):
        xp = xp.detach().requires_grad_(True)
        score = score_fn(xp, t)
        (grad,) = torch.autograd.grad(score.sum(), xp)
        check_finite(grad, "defense gradient")
        direction = normalize_per_sample(grad, grad_norm)
        if noise:
            sigma = noise_std(t, steps)
            if sigma > 0:
                z = per_sample_draw("normal", x.shape[1:], seeds, ("defense-noise", t), device=x.device, dtype=x.dtype)
                direction = direction + sigma * z
        xp = xp.detach() + eta * direction.sign()
        xp = torch.min(torch.max(xp, x0 - eps_v), x0 + eps_v).clamp(0, 1)
    return xp.detach()


def defense(name: str = "equivariance", heads: dict | None = None, task: str = "classification", **params) -> Any:
    if name in ("rotation", "contrastive") and heads is not None:
        params.setdefault("head", heads[(name, task)])
    params.setdefault("steps", 4)
    return build_defense(name, **params).with_attack_eps(ATTACK_EPS)


def budgets(d: Any) -> tuple[float, float]:
    eps_v = d.eps_v / 255.0
    return eps_v, (d.eta if d.eta is not None else 2.0 * d.eps_v) / 255.0


# ------------------------------------------------------------------------------------------ the paper's defaults


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("name", ["equivariance", "invariance", "rotation", "contrastive"])
def test_defaults_are_bit_identical_to_algorithm_1(name: str, task: str, selfsup_heads) -> None:
    s = make_task(task, n=3)
    for extra in ({}, {"random_start": True}, {"noise": False, "grad_norm": "l2"}):
        d = defense(name, selfsup_heads, task, **extra)
        eps_v, eta = budgets(d)
        for seeds in ([1, 2, 3], [7, 7, 900]):
            score = functools.partial(d.score, s.adapter)
            frozen = paper_optimize_objective(score, s.x, eps_v=eps_v, eta=eta, steps=d.steps, seeds=seeds, **extra)
            assert torch.equal(d.purify(s.adapter, s.x, seeds), frozen), (name, task, extra, seeds)


def test_options_spelled_at_their_defaults_are_the_defaults() -> None:
    s = make_task("classification", n=2)
    plain = defense()
    spelled = defense(
        step_rule="sign", schedule={"name": "constant"}, noise_scale=1, patience=None, min_delta=0, keep_best=False
    )
    assert spelled.params() == plain.params() and spelled == plain
    assert torch.equal(spelled.purify(s.adapter, s.x, [1, 2]), plain.purify(s.adapter, s.x, [1, 2]))


# Every optimising defense's params() as it was before the options: the cache and result keys are made from it.
PAPER_PARAMS = {
    "name": "equivariance",
    "steps": 20,
    "eps_v": None,
    "eps_v_factor": 1.5,
    "eta": None,
    "noise": True,
    "random_start": False,
    "grad_norm": "rms",
    "views": "paper",
    "resample_views": True,
    "view_seed": 0,
    "batched": True,
    "max_batch_pixels": None,
    "objective": "equivariance",
}


def test_params_of_configs_without_the_options_are_unchanged() -> None:
    assert build_defense("equivariance").params() == PAPER_PARAMS
    assert list(build_defense("equivariance").params()) == list(PAPER_PARAMS)
    assert build_defense("invariance", steps=5).params() == {**PAPER_PARAMS, "name": "invariance", "steps": 5,
                                                             "objective": "invariance"}  # fmt: skip
    old_rotation_keys = {"name", "steps", "eps_v", "eps_v_factor", "eta", "noise", "random_start", "grad_norm"}
    assert set(build_defense("rotation").params()) == old_rotation_keys | {"head", "for_model", "head_files"}


def test_params_record_options_that_differ_in_canonical_form() -> None:
    a = build_defense("equivariance", schedule={"name": "step", "every": 5})
    b = build_defense("equivariance", schedule={"name": "step", "every": 5, "gamma": 0.5})
    assert a.params() == b.params() == {**PAPER_PARAMS, "schedule": {"name": "step", "every": 5, "gamma": 0.5}}
    c = build_defense("equivariance", schedule="cosine", step_rule="adam", noise_scale=0.5, patience=3, min_delta=1e-3)
    assert {k: v for k, v in c.params().items() if k not in PAPER_PARAMS} == {
        "step_rule": "adam",
        "schedule": {"name": "cosine", "final": 0.0},
        "noise_scale": 0.5,
        "patience": 3,
        "min_delta": 1e-3,
    }
    assert c.with_attack_eps(4.0).params()["schedule"] == {"name": "cosine", "final": 0.0}


# ------------------------------------------------------------------------------------------------ every option

OPTIONS: list[dict[str, Any]] = [
    {"step_rule": "normalized", "eta": 2.0},
    {"step_rule": "normalized", "grad_norm": "l2", "eta": 40.0},
    {"step_rule": "adam", "eta": 2.0},
    {"schedule": "cosine"},
    {"schedule": {"name": "step", "every": 2, "gamma": 0.25}},
    {"noise_scale": 0.3},
    {"noise": False, "step_rule": "normalized", "eta": 3.0},
    {"patience": 1},
    {"patience": 2, "min_delta": 1e-4, "step_rule": "adam", "eta": 1.0},
    {"keep_best": True},
    {"keep_best": True, "best_by": "step", "schedule": "cosine"},
    {"random_start": True, "patience": 2, "step_rule": "normalized", "eta": 2.0},
]
OPTION_IDS = ["-".join(f"{k}={v if not isinstance(v, dict) else v['name']}" for k, v in o.items()) for o in OPTIONS]


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_every_option_stays_in_the_ball_is_per_sample_and_seeded(options: dict[str, Any]) -> None:
    s = make_task("classification", n=4, dtype=torch.float64)  # float64: batch-size rounding cannot flip a sign
    d = defense(**options)
    eps_v, _ = budgets(d)
    out = d.purify(s.adapter, s.x, SEEDS)
    assert out.shape == s.x.shape and out.dtype == s.x.dtype and not out.requires_grad
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float((out - s.x).abs().max()) <= eps_v + 1e-9
    # Independent of batch-mates: each sample alone, and a reordered subset, give the same images.
    for i in (0, 3):
        assert torch.equal(d.purify(s.adapter, s.x[i : i + 1], SEEDS[i : i + 1]), out[i : i + 1]), i
    sub = d.purify(s.adapter, s.x[[2, 1]], [SEEDS[2], SEEDS[1]])
    assert torch.equal(sub, out[[2, 1]])
    # Seeded: the same seeds repeat; other seeds change a randomised defense's images.
    assert torch.equal(d.purify(s.adapter, s.x.clone(), list(SEEDS)), out)
    other = d.purify(s.adapter, s.x, [sd + 5 for sd in SEEDS])
    assert d.randomized == (not torch.equal(other, out))


@pytest.mark.parametrize("name", ["rotation", "contrastive", "invariance"])
def test_options_on_the_other_optimising_defenses(name: str, selfsup_heads) -> None:
    """The contrastive objective itself differs by ~1e-16 between batch sizes (batched reductions), which sign steps
    hide and Adam's continuous steps carry: alone vs in a batch is compared to 1e-12 here (exactly for the
    equivariance defense above); with the batch-mates replaced (same batch size) it is exact."""
    s = make_task("segmentation", n=3, dtype=torch.float64)
    d = defense(name, selfsup_heads, "segmentation", step_rule="adam", eta=2.0, schedule="cosine", keep_best=True)
    out = d.purify(s.adapter, s.x, SEEDS[:3])
    assert float((out - s.x).abs().max()) <= d.eps_v / 255 + 1e-9 and 0.0 <= float(out.min())
    assert torch.allclose(d.purify(s.adapter, s.x[1:2], SEEDS[1:2]), out[1:2], rtol=0, atol=1e-12)
    mates = s.x.clone()
    mates[[0, 2]] = 1 - mates[[0, 2]]
    assert torch.equal(d.purify(s.adapter, mates, SEEDS[:3])[1], out[1])


def test_non_sign_steps_leave_the_corners_of_the_ball() -> None:
    """Issue #19: sign steps of eta = 2 eps_v put every pixel at x +- eps_v (or at 0/1); the others need not."""
    s = make_task("classification", n=3)
    x = s.x.clamp(0.1, 0.9)

    def at_corner(d: Any) -> float:
        moved = (d.purify(s.adapter, x, [1, 2, 3]) - x).abs()
        return float((moved > d.eps_v / 255 - 1e-6).double().mean())

    assert at_corner(defense(steps=5)) == 1.0
    assert at_corner(defense(steps=5, step_rule="normalized", eta=2.0)) < 0.2
    assert at_corner(defense(steps=5, step_rule="adam", eta=1.0)) < 0.2


def test_schedules_scale_the_step() -> None:
    """Without noise, one normalised step moves by eta x factor(0) = eta, the next by eta x factor(1)."""
    s = make_task("classification", n=2)
    x = s.x.clamp(0.3, 0.7)
    for spec, second in (("constant", 1.0), ({"name": "step", "every": 1, "gamma": 0.5}, 0.5)):
        d = defense(steps=2, noise=False, step_rule="sign", eta=1.0, eps_v=10.0, schedule=spec)
        one = defense(steps=1, noise=False, step_rule="sign", eta=1.0, eps_v=10.0, schedule=spec)
        x1 = one.purify(s.adapter, x, [1, 2])
        x2 = d.purify(s.adapter, x, [1, 2])
        assert torch.allclose((x1 - x).abs(), torch.full_like(x, 1 / 255), atol=1e-6)
        assert torch.allclose((x2 - x1).abs(), torch.full_like(x, second / 255), atol=1e-6)
    cos = build_schedule("cosine")
    assert cos.factor(0, 4) == 1.0 and cos.factor(2, 4) == pytest.approx(0.5) and 0 < cos.factor(3, 4) < 0.2


def test_noise_scale_scales_the_annealed_noise() -> None:
    """A linear objective under sign steps: with the noise scaled down the steps follow the gradient's sign, scaled up
    they follow the noise (only the first of two steps has noise: the annealed std is 0 at the last step)."""
    x = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)
    g = torch.linspace(-1, 1, 64, dtype=torch.float64).view(1, 1, 8, 8)

    def score(xp: torch.Tensor, t: int) -> torch.Tensor:
        return (xp * g).flatten(1).sum(1)

    common = {"eps_v": 0.5, "eta": 0.01, "steps": 2, "seeds": [3], "step_rule": "sign"}
    quiet = optimize_objective(score, x, noise_scale=1e-6, **common)
    loud = optimize_objective(score, x, noise_scale=1e3, **common)
    assert torch.equal(torch.sign(quiet - x), torch.sign(g))  # the gradient wins
    assert not torch.equal(torch.sign(loud - x), torch.sign(g))  # the noise wins


# ---------------------------------------------------------------------------------------- early stopping, best


class Recorder:
    """A score function that records every iterate it is asked about, with the step whose objective it used."""

    def __init__(self, d: Any, adapter: Any) -> None:
        self.d, self.adapter = d, adapter
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, xp: torch.Tensor, t: int) -> torch.Tensor:
        self.calls.append((t, xp.detach().clone()))
        return self.d.score(self.adapter, xp, t)


def run_one(d: Any, adapter: Any, x: torch.Tensor, seed: int, **options) -> tuple[torch.Tensor, Recorder]:
    eps_v, eta = budgets(d)
    rec = Recorder(d, adapter)
    out = optimize_objective(
        rec,
        x,
        eps_v=eps_v,
        eta=eta,
        steps=d.steps,
        seeds=[seed],
        objective_varies=d.objective_varies_by_step,
        **options,
    )
    return out, rec


@pytest.mark.parametrize("best_by", ["fixed", "step"])
@pytest.mark.parametrize("stop", [{"patience": 1}, {"patience": 2, "min_delta": 1e-3}, {"keep_best": True}])
def test_the_returned_iterate_is_the_best_one_seen(best_by: str, stop: dict[str, Any]) -> None:
    """Per sample (alone: the recorder cannot tell batch-mates apart): the returned image is an iterate the optimiser
    visited, and no visited iterate scores higher under the objective iterates are compared by (fixed: step 0's,
    evaluated again here; step: the value the step computed)."""
    s = make_task("classification", n=3, dtype=torch.float64)
    d = defense(steps=6)
    for i in range(3):
        x = s.x[i : i + 1]
        out, rec = run_one(d, s.adapter, x, SEEDS[i], best_by=best_by, **stop)
        seen = [(t, xi) for t, xi in rec.calls if best_by == "step" or t == 0]
        values = [float(d.score(s.adapter, xi, t if best_by == "step" else 0).detach()) for t, xi in seen]
        returned = [v for (_, xi), v in zip(seen, values, strict=True) if torch.equal(xi, out)]
        assert returned, "the returned image is not an iterate the optimiser evaluated"
        assert max(returned) == max(values)


def test_patience_stops_a_flat_objective_and_returns_its_start() -> None:
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []

    def flat(xp: torch.Tensor, t: int) -> torch.Tensor:
        calls.append(t)
        return xp.flatten(1).sum(1) * 0.0

    out = optimize_objective(flat, x, eps_v=0.1, eta=0.2, steps=10, seeds=[1, 2], patience=2, objective_varies=False)
    assert torch.equal(out, x)  # no iterate beat the start: both samples keep it
    assert calls == [0, 1, 2]  # the start, then two steps without improvement: stopped before the 3rd step


def test_a_stopped_sample_leaves_the_batch_and_keeps_its_best() -> None:
    """Sample 0's objective is flat (it stops after one stale step), sample 1's rises: sample 1 goes on alone."""
    x = torch.full((2, 1, 4, 4), 0.5, dtype=torch.float64)
    sizes: list[int] = []

    def score(xp: torch.Tensor, t: int) -> torch.Tensor:
        sizes.append(xp.shape[0])
        rising = xp.flatten(1).sum(1)
        # While both are in the batch, row 0 (sample 0) is flat; once it has stopped, the one row left is sample 1.
        return torch.where(torch.arange(xp.shape[0]) == 0, rising * 0.0, rising) if xp.shape[0] == 2 else rising

    out = optimize_objective(score, x, eps_v=0.2, eta=0.05, steps=4, seeds=[1, 2], noise=False, patience=1)
    assert torch.equal(out[0], x[0])  # stopped at its start (its first step did not improve)
    assert torch.allclose(out[1], torch.full_like(x[1], 0.7))  # 4 steps of +0.05, up to the ball's edge
    assert sizes[0] == 2 and sizes[-1] == 1


def test_samples_going_on_after_a_batch_mate_stopped_keep_their_own_noise_and_state() -> None:
    """Sample 0's objective is flat (it stops at once), the others' rises: each result equals the sample alone."""
    x = 0.3 + 0.6 * torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[0] = 0.1
    g = torch.linspace(-1, 1, 36, dtype=torch.float64).view(1, 1, 6, 6)

    def score(xp: torch.Tensor, t: int) -> torch.Tensor:
        live = (xp.flatten(1).mean(1) > 0.2).double()  # per sample, from its own pixels
        return live * (xp * g).flatten(1).sum(1)

    for rule in ("sign", "adam"):
        opts = {"eps_v": 0.05, "eta": 0.01, "steps": 6, "step_rule": rule, "patience": 1}
        batch = optimize_objective(score, x, seeds=[5, 6, 7, 8], **opts)
        assert torch.equal(batch[0], x[0])
        for i in range(4):
            assert torch.equal(optimize_objective(score, x[i : i + 1], seeds=[5 + i], **opts), batch[i : i + 1])


def test_best_by_fixed_costs_one_extra_forward_per_step_only_when_the_objective_varies() -> None:
    s = make_task("classification", n=2)
    varying = defense(steps=5)
    _, rec = run_one(varying, s.adapter, s.x[:1], 1, keep_best=True)
    assert len(rec.calls) == 5 + 4 + 1  # 5 steps, 4 re-evaluations under step 0's views, the last iterate
    fixed_views = defense(steps=5, resample_views=False)
    _, rec = run_one(fixed_views, s.adapter, s.x[:1], 1, keep_best=True)
    assert len(rec.calls) == 5 + 1 and not fixed_views.objective_varies_by_step
    _, rec = run_one(varying, s.adapter, s.x[:1], 1, keep_best=True, best_by="step")
    assert len(rec.calls) == 5 + 1
    # What the dry run counts (an upper bound: early stops are not counted).
    assert defense(steps=5).objective_evaluations() == 5
    assert defense(steps=5, keep_best=True).objective_evaluations() == 10
    assert defense(steps=5, patience=2, resample_views=False).objective_evaluations() == 6
    assert defense(steps=5, keep_best=True, best_by="step").objective_evaluations() == 6


# ------------------------------------------------------------------------------------------------- bad options

BAD: list[tuple[dict[str, Any], str]] = [
    ({"schedule": "cosin"}, r"equivariance\.schedule: unknown step-size schedule 'cosin'; did you mean 'cosine'\?"),
    ({"schedule": {"every": 3}}, r"equivariance\.schedule: expected a schedule name or a mapping with 'name'"),
    ({"schedule": 5}, r"equivariance\.schedule: expected a schedule name"),
    ({"schedule": {"name": "step", "every": 0}}, r"equivariance\.schedule\.every: expected an integer >= 1"),
    ({"schedule": {"name": "step", "gamma": 0}}, r"equivariance\.schedule\.gamma: expected 0 < gamma <= 1"),
    ({"schedule": {"name": "step", "gamma": -0.5}}, r"equivariance\.schedule\.gamma"),
    ({"schedule": {"name": "cosine", "final": -0.1}}, r"equivariance\.schedule\.final: expected 0 <= final <= 1"),
    ({"schedule": {"name": "cosine", "finale": 0.1}}, r"equivariance\.schedule: step-size schedule 'cosine' got unkn"),
    ({"step_rule": "adm"}, r"equivariance\.step_rule: unknown step rule 'adm'; did you mean 'adam'\?"),
    ({"noise_scale": 0}, r"equivariance\.noise_scale: expected a finite number > 0, got 0 \(noise: false turns"),
    ({"noise_scale": -1.0}, r"equivariance\.noise_scale: expected a finite number > 0"),
    ({"noise_scale": math.nan}, r"equivariance\.noise_scale: expected a finite number > 0"),
    ({"noise": False, "noise_scale": 0.5}, r"equivariance\.noise_scale: 0\.5 scales the annealed noise, but noise is"),
    ({"patience": 0}, r"equivariance\.patience: expected an integer >= 1, got 0"),
    ({"patience": 2.5}, r"equivariance\.patience: expected an integer >= 1, got 2\.5"),
    ({"patience": 2, "min_delta": -1e-3}, r"equivariance\.min_delta: expected a finite number >= 0"),
    ({"min_delta": 0.01}, r"equivariance\.min_delta: 0\.01 applies to early stopping, but patience is not set"),
    ({"best_by": "step"}, r"equivariance\.best_by: 'step' compares iterates, but neither patience nor keep_best"),
    ({"keep_best": True, "best_by": "fixd"}, r"equivariance\.best_by: unknown best_by 'fixd'; did you mean 'fixed'"),
    ({"keep_best": "yes"}, r"equivariance\.keep_best: expected true or false, got 'yes'"),
]


@pytest.mark.parametrize("params,message", BAD, ids=[str(sorted(p.items())) for p, _ in BAD])
def test_bad_options_fail_in_one_line_naming_the_field(params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as err:
        build_defense("equivariance", **params)
    assert "\n" not in str(err.value)


def test_every_optimising_defense_validates_the_options(selfsup_heads) -> None:
    for name in ("invariance", "rotation", "contrastive"):
        with pytest.raises(InvalidInputError, match=rf"{name}\.schedule: unknown step-size schedule 'cosin'"):
            build_defense(name, schedule="cosin")
        with pytest.raises(InvalidInputError, match=rf"{name}\.patience: expected an integer >= 1"):
            build_defense(name, patience=-1)


def test_the_schedule_registry_lists_the_schedules() -> None:
    assert STEP_SCHEDULES.names() == ["constant", "cosine", "step"]
