"""Contracts of every registered attack on classification and segmentation adapters."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import equicore  # noqa: F401  (registrations)
from equicore.adapters import pixel_cross_entropy
from equicore.attacks import Attack, build_attack, build_loss, project, projected_gradient
from equicore.attacks import run_attack as _run_attack
from equicore.defenses import build_defense
from equicore.registry import ATTACKS, LOSSES
from tests.models_for_tests import IGNORE_INDEX, TASKS, TaskSetup, make_task

NORMS = {"linf": 8.0, "l2": 96.0}  # budgets in /255 units

# What the defense-aware attacks (BPDA, AA) attack in these contracts: a small randomised equivariance defense.
ADAPTIVE_TARGET = build_defense("equivariance", steps=2, views="flip", eps_v=4.0)


def run_attack(attack, adapter, x, y, seeds=None, **kw):
    """Every registered attack through one call; defense-aware ones attack ``ADAPTIVE_TARGET``."""
    return _run_attack(attack, adapter, x, y, seeds, defense=ADAPTIVE_TARGET, **kw)


def attack_tasks(name: str) -> tuple[str, ...]:
    """Tasks an attack applies to: its own ``tasks`` meta, else its loss's."""
    meta = ATTACKS.meta(name)
    if "tasks" in meta:
        return tuple(meta["tasks"])
    return tuple(LOSSES.meta(meta.get("loss", "ce")).get("tasks", TASKS))


def cases() -> list:
    out = []
    for name in ATTACKS.names():
        for task in TASKS:
            marks = () if task in attack_tasks(name) else pytest.mark.skip(reason=f"{name} does not apply to {task}")
            out.append(pytest.param(name, task, marks=marks, id=f"{name}-{task}"))
    return out


def small_attack(name: str, norm: str = "linf", eps: float | None = None, **extra) -> Attack:
    """The registered attack with its own step rules, at most 3 steps (one-step attacks stay one step)."""
    default = build_attack(name)
    eps = NORMS[norm] if eps is None else eps
    if default.optimizer == "square":
        return build_attack(name, eps=eps, norm=norm, n_queries=12, **extra)
    steps = min(default.steps, 3)
    if default.optimizer == "apgd":  # APGD sets its own step size; keep the top-k target sweep short
        top = {"n_target_classes": 2} if extra.get("target", default.target) == "top" else {}
        return build_attack(name, eps=eps, norm=norm, steps=steps, **top, **extra)
    step_size = eps if steps == 1 else eps / 2
    return build_attack(name, eps=eps, norm=norm, steps=steps, step_size=step_size, **extra)


def ce_to(setup: TaskSetup, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = setup.adapter.logits(x)
    if setup.task == "segmentation":
        return pixel_cross_entropy(logits, labels, IGNORE_INDEX)
    return F.cross_entropy(logits, labels, reduction="none")


def hit_rate(setup: TaskSetup, x: torch.Tensor, labels: torch.Tensor) -> float:
    pred = setup.adapter.predict(x)
    valid = labels != IGNORE_INDEX
    return float((pred == labels)[valid].float().mean())


@pytest.mark.parametrize("name,task", cases())
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_output_in_range_and_inside_ball(name: str, task: str, norm: str, seeds: list[int]) -> None:
    s = make_task(task, n=5)
    attack = small_attack(name, norm)
    x_adv = run_attack(attack, s.adapter, s.x, s.y, seeds).x_adv
    assert x_adv.shape == s.x.shape and x_adv.dtype == s.x.dtype and not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    delta = (x_adv - s.x).flatten(1)
    eps = attack.eps / 255.0
    if norm == "linf":
        assert float(delta.abs().max()) <= eps + 1e-6
    else:
        assert float(delta.norm(dim=1).max()) <= eps + 1e-5
    assert float(delta.abs().max()) > 0.5 / 255, "the attack must actually move the images"


@pytest.mark.parametrize("name,task", cases())
def test_attack_raises_its_loss(name: str, task: str, seeds: list[int]) -> None:
    s = make_task(task, n=5)
    attack = small_attack(name)
    loss_fn = build_loss(attack.loss, s.adapter, s.y)
    x_adv = run_attack(attack, s.adapter, s.x, s.y, seeds).x_adv
    with torch.no_grad():
        before, after = loss_fn(s.x), loss_fn(x_adv)
    assert before.shape == (5,)
    if attack.target == "top":  # APGD-T maximises DLR towards other classes: the untargeted DLR rises overall
        assert float(after.sum()) > float(before.sum())
        return
    # Capped losses (CW at kappa) can be flat for already-fooled samples; none may go down noticeably.
    assert float(after.sum()) > float(before.sum())
    assert bool((after >= before - 1e-3).all())


@pytest.mark.parametrize("name,task", cases())
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_same_seed_is_bit_identical_and_seeds_matter_only_for_random_starts(
    name: str, task: str, norm: str, seeds: list[int]
) -> None:
    s = make_task(task, n=5)
    attack = small_attack(name, norm)
    a = run_attack(attack, s.adapter, s.x, s.y, seeds).x_adv
    b = run_attack(attack, s.adapter, s.x, s.y, list(seeds)).x_adv
    assert torch.equal(a, b)
    other = run_attack(attack, s.adapter, s.x, s.y, [sd + 1 for sd in seeds]).x_adv
    if attack.random_init:
        for i in range(len(seeds)):  # every sample's start comes from its own seed
            if attack.gradient_free and torch.equal(a[i], s.x[i]):
                continue  # Square spends one query on an image already misclassified and leaves it as it is
            assert not torch.equal(a[i], other[i])
    else:
        assert torch.equal(a, other)


@pytest.mark.parametrize("name,task", cases())
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_result_does_not_depend_on_batch_mates(name: str, task: str, norm: str, seeds: list[int]) -> None:
    """Float64 models: batch-size-dependent kernels round differently, and in float32 that rounding can flip the sign
    of a ~0 gradient entry; in float64 any difference can only come from a real dependence on batch-mates."""
    s = make_task(task, n=5, dtype=torch.float64)
    attack = small_attack(name, norm)
    full = run_attack(attack, s.adapter, s.x, s.y, seeds).x_adv
    for i in (0, 3):
        alone = run_attack(attack, s.adapter, s.x[i : i + 1], s.y[i : i + 1], seeds[i : i + 1]).x_adv
        if norm == "linf":
            assert torch.equal(full[i : i + 1], alone)
        else:  # continuous L2 steps: equal up to rounding
            torch.testing.assert_close(full[i : i + 1], alone, rtol=0, atol=1e-12)
        # And a different set of batch-mates (a permuted sub-batch) gives the same image too.
        idx = [4, i, 1] if i != 1 else [4, i, 2]
        sub = run_attack(attack, s.adapter, s.x[idx], s.y[idx], [seeds[j] for j in idx]).x_adv
        torch.testing.assert_close(sub[1:2], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_batch_independence_in_float32(task: str, seeds: list[int]) -> None:
    """In float32 (the production dtype) at most a handful of ~0-gradient pixels may differ."""
    s = make_task(task, n=5)
    attack = small_attack("pgd")
    full = run_attack(attack, s.adapter, s.x, s.y, seeds).x_adv
    alone = run_attack(attack, s.adapter, s.x[2:3], s.y[2:3], seeds[2:3]).x_adv
    assert float((full[2:3] == alone).float().mean()) >= 0.99


@pytest.mark.parametrize("name,task", cases())
def test_targeted_attack_moves_predictions_towards_targets(name: str, task: str, seeds: list[int]) -> None:
    if build_attack(name).optimizer == "square":
        pytest.skip("the Square attack here is untargeted")
    s = make_task(task, n=6)
    # APGD's own targeted loss is DLR over the top-k sweep; towards one named target it is held to CE like the rest.
    ce = {"loss": "ce"} if build_attack(name).optimizer == "apgd" and build_attack(name).loss != "ce" else {}
    attack = small_attack(name, eps=32.0, targeted=True, target="next", **ce)
    result = run_attack(attack, s.adapter, s.x, s.y, [*seeds, 606])
    targets = result.targets
    assert targets is not None and targets.shape == s.y.shape
    if task == "segmentation":  # ignored pixels stay ignored, the rest get the next class
        assert torch.equal(targets == IGNORE_INDEX, s.y == IGNORE_INDEX)
    valid = s.y != IGNORE_INDEX
    assert bool((targets[valid] != s.y[valid]).all())
    ce_before, ce_after = ce_to(s, s.x, targets), ce_to(s, result.x_adv, targets)
    assert float(ce_after.mean()) < float(ce_before.mean())
    assert hit_rate(s, result.x_adv, targets) > hit_rate(s, s.x, targets)


def test_targets_modes() -> None:
    s = make_task("classification", n=4)
    for mode, check in (
        ("next", lambda t: torch.equal(t, (s.y + 1) % 4)),
        ("class:2", lambda t: bool((t == 2).all())),
        ("least_likely", lambda t: torch.equal(t, s.adapter.logits(s.x).argmin(1))),
    ):
        attack = build_attack("pgd", eps=4, steps=1, targeted=True, target=mode)
        assert check(run_attack(attack, s.adapter, s.x, s.y, [1, 2, 3, 4]).targets), mode


def test_fgsm_steps_by_eps_through_either_entry_point() -> None:
    assert build_attack("fgsm", eps=8).step_size == 8
    assert ATTACKS.build("fgsm", eps=8).step_size == 8
    assert build_attack("fgsm", eps=8, step_size=2).step_size == 2


def test_attack_params_are_canonical_data() -> None:
    for name in ATTACKS.names():
        a = build_attack(name)
        assert a.name == name
        p = a.params()
        assert Attack(**p) == a
        assert dataclasses.replace(a, eps=2.0).params()["eps"] == 2.0


def test_projection_and_zero_steps() -> None:
    d = torch.tensor([[3.0, -4.0]])
    assert torch.allclose(project(d, 1.0, "l2").norm(), torch.tensor(1.0))
    assert torch.equal(project(d, 1.0, "linf"), torch.tensor([[1.0, -1.0]]))
    x = torch.full((1, 1, 2, 2), 0.5)
    out = projected_gradient(lambda z: z.flatten(1).sum(1), x, eps=4, step_size=1, steps=0, random_init=False)
    assert torch.equal(out, x)


def test_momentum_differs_from_plain_steps(seeds: list[int]) -> None:
    s = make_task("classification", n=5)
    mim = run_attack(small_attack("mim"), s.adapter, s.x, s.y, seeds).x_adv
    ifgsm = run_attack(small_attack("ifgsm"), s.adapter, s.x, s.y, seeds).x_adv
    assert not torch.equal(mim, ifgsm)


def test_projected_gradient_attacks_keep_their_identity_from_before_apgd_and_square() -> None:
    """An attack's canonical parameters seed its random start and key its cache: the fields APGD and Square added
    must not enter a PGD-style attack's, or every earlier result would be redrawn."""
    before = {
        "name", "eps", "step_size", "steps", "norm", "random_init", "momentum", "loss", "loss_params", "targeted",
        "target", "adaptive", "eot", "lambda_e", "fallback_views",
    }  # fmt: skip
    for name in ("fgsm", "ifgsm", "pgd", "mim", "cw", "houdini"):
        assert set(build_attack(name).params()) == before, name
    assert set(build_attack("bpda", optimizer="pgd", step_size=1).params()) == before
    assert {"optimizer", "n_restarts", "rho"} <= set(build_attack("apgd").params())
