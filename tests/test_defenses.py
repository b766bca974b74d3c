"""Contracts of every registered defense, and batched views == the faithful per-view loop."""

from __future__ import annotations

import json

import pytest
import torch

import equicore  # noqa: F401  (registrations)
from equicore.adapters import SegmentationAdapter
from equicore.defenses import ConsistencyDefense, Defense, build_defense
from equicore.equivariance import (
    consistency_score,
    equivariance_score,
    invariance_score,
    sample_view_params,
    view_features,
)
from equicore.errors import InvalidInputError
from equicore.registry import DEFENSES, accepted_params
from equicore.transforms import paper_views
from tests.models_for_tests import TASKS, TinySegmenter, defense_params_for, make_task, random_images, seeded_model

ATTACK_EPS = 8.0


def defense_cases() -> list:
    out = []
    for name in DEFENSES.names():
        tasks = DEFENSES.meta(name).get("tasks", TASKS)
        for task in TASKS:
            marks = () if task in tasks else pytest.mark.skip(reason=f"{name} does not apply to {task}")
            out.append(pytest.param(name, task, marks=marks, id=f"{name}-{task}"))
    return out


def small_defense(name: str, task: str | None = None, heads: dict | None = None, **params) -> Defense:
    """The registered defense with at most 3 optimisation steps, budgets resolved from an eps=8 attack; with ``task``
    and ``heads`` (the ``selfsup_heads`` fixture), the head a self-supervised defense needs for that task's model."""
    if task is not None and heads is not None:
        params = {**defense_params_for(name, task, heads), **params}
    accepted = accepted_params(DEFENSES.get(name)) or set()
    if "steps" in accepted:
        params.setdefault("steps", 3)
    return DEFENSES.build(name, **params).with_attack_eps(ATTACK_EPS)


def eps_v_of(defense: Defense) -> float:
    return float(getattr(defense, "eps_v", None) or 0.0) / 255.0


@pytest.mark.parametrize("name,task", defense_cases())
def test_purified_images_in_range_and_inside_eps_v_ball(name: str, task: str, seeds: list[int], selfsup_heads) -> None:
    s = make_task(task, n=5)
    d = small_defense(name, task, selfsup_heads)
    out = d.purify(s.adapter, s.x, seeds)
    assert out.shape == s.x.shape and out.dtype == s.x.dtype and not out.requires_grad
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    eps_v = eps_v_of(d)
    assert float((out - s.x).abs().max()) <= eps_v + 1e-6
    if eps_v > 0:
        assert float((out - s.x).abs().max()) > 0.5 / 255, "a defense with a budget should use it"


@pytest.mark.parametrize("name,task", defense_cases())
def test_purify_is_seeded_and_repeatable(name: str, task: str, seeds: list[int], selfsup_heads) -> None:
    s = make_task(task, n=5)
    d = small_defense(name, task, selfsup_heads)
    a = d.purify(s.adapter, s.x, seeds)
    b = d.purify(s.adapter, s.x.clone(), list(seeds))
    assert torch.equal(a, b)
    other = d.purify(s.adapter, s.x, [sd + 7 for sd in seeds])
    if d.randomized:
        for i in range(len(seeds)):
            assert not torch.equal(a[i], other[i])
    else:
        assert torch.equal(a, other)


@pytest.mark.parametrize("name,task", defense_cases())
def test_purify_does_not_depend_on_batch_mates(name: str, task: str, seeds: list[int], selfsup_heads) -> None:
    """Float64 so that batch-size-dependent rounding cannot flip a ~0 gradient's sign (see test_attacks)."""
    s = make_task(task, n=5, dtype=torch.float64)
    d = small_defense(name, task, selfsup_heads)
    full = d.purify(s.adapter, s.x, seeds)
    for i in (1, 4):
        alone = d.purify(s.adapter, s.x[i : i + 1], seeds[i : i + 1])
        assert torch.equal(full[i : i + 1], alone)
    sub = d.purify(s.adapter, s.x[[3, 1]], [seeds[3], seeds[1]])
    assert torch.equal(sub[1:2], full[1:2])


@pytest.mark.parametrize("name", DEFENSES.names())
def test_with_attack_eps_resolves_eps_v(name: str) -> None:
    d = DEFENSES.build(name)
    resolved = d.with_attack_eps(ATTACK_EPS)
    if "eps_v" not in (accepted_params(DEFENSES.get(name)) or set()):
        assert resolved.params() == d.params()
        return
    assert d.eps_v is None  # unresolved by default: relative to the attack
    assert resolved.eps_v == pytest.approx(1.5 * ATTACK_EPS)
    assert DEFENSES.build(name, eps_v=5.0).with_attack_eps(ATTACK_EPS).eps_v == 5.0
    assert DEFENSES.build(name, eps_v_factor=2.5).with_attack_eps(4.0).eps_v == pytest.approx(10.0)
    with pytest.raises(InvalidInputError, match="eps_v"):
        d.purify(make_task("classification").adapter, torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_params_are_json(name: str) -> None:
    d = small_defense(name)
    p = d.params()
    assert p["name"] == name
    assert json.loads(json.dumps(p)) == p


def test_paper_step_size_is_twice_eps_v() -> None:
    """eta defaults to 2 * eps_v (paper): with one noiseless step every pixel moves by exactly eps_v (or clips)."""
    s = make_task("segmentation", n=2)
    x = s.x.clamp(0.2, 0.8)
    d = build_defense("equivariance", steps=1, noise=False).with_attack_eps(4.0)
    out = d.purify(s.adapter, x, [1, 2])
    moved = (out - x).abs()
    assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], 6.0 / 255), atol=1e-6)


# ----------------------------------------------------------------------------------- batched views vs per-view loop


@pytest.fixture(scope="module")
def seg_views():
    model = seeded_model(TinySegmenter, 3)
    adapter = SegmentationAdapter(model)
    x = random_images(3, 3, (32, 40), seed=11)
    views = paper_views()
    assert len(views) == 8
    return adapter, x, views


def test_batched_views_equal_the_per_view_loop(seg_views) -> None:
    adapter, x, views = seg_views
    for seed in range(3):
        params = sample_view_params(views, seed, (32, 40))
        runs = {
            "batched": view_features(adapter.features, x, views, params, batched=True),
            "loop": view_features(adapter.features, x, views, params, batched=False),
            "chunked": view_features(adapter.features, x, views, params, batched=True, max_batch_pixels=2 * 32 * 40),
        }
        assert runs["loop"].forwards == len(views) + 1  # one forward per view + one for the reference
        assert runs["batched"].forwards < runs["loop"].forwards
        assert runs["chunked"].forwards > runs["batched"].forwards
        ref = runs["loop"]
        for key, vf in runs.items():
            torch.testing.assert_close(vf.reference, ref.reference, rtol=0, atol=1e-5, msg=key)
            for a, b in zip(vf.inverted, ref.inverted, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=key)
            for objective in (equivariance_score, invariance_score):
                torch.testing.assert_close(objective(vf), objective(ref), rtol=0, atol=1e-5, msg=key)


def test_batched_score_gradients_equal_the_loop(seg_views) -> None:
    adapter, x, views = seg_views
    params = sample_view_params(views, 5, (32, 40))
    grads = []
    for kwargs in ({"batched": True}, {"batched": False}, {"batched": True, "max_batch_pixels": 3000}):
        xr = x.clone().requires_grad_(True)
        score = consistency_score(adapter.features, xr, views, params, **kwargs)
        (g,) = torch.autograd.grad(score.sum(), xr)
        grads.append(g)
    scale = float(grads[1].abs().max())
    for g in grads[::2]:
        assert float((g - grads[1]).abs().max()) <= 1e-4 * scale


def test_batched_defense_equals_the_per_view_loop(seg_views) -> None:
    """The full K=8, T=20 defense: identical purified pixels except where a ~0 gradient entry's sign is ambiguous."""
    adapter, x, _ = seg_views
    seeds = [5, 6, 7]
    outs, scores = {}, {}
    for key, kwargs in (
        ("batched", {"batched": True}),
        ("loop", {"batched": False}),
        ("chunked", {"batched": True, "max_batch_pixels": 4 * 32 * 40}),
    ):
        d = build_defense("equivariance", steps=20, **kwargs).with_attack_eps(ATTACK_EPS)
        assert isinstance(d, ConsistencyDefense) and len(d.view_params(0, tuple(x.shape[-2:]))) == 8  # K = 8
        outs[key] = d.purify(adapter, x, seeds)
        with torch.no_grad():
            scores[key] = d.score(adapter, outs[key])
    for key in ("batched", "chunked"):
        same = float((outs[key] == outs["loop"]).float().mean())
        assert same >= 0.999, (key, same)
        torch.testing.assert_close(scores[key], scores["loop"], rtol=0, atol=1e-4)
