"""Contracts every registry entry must meet; parametrized over the registries so new entries are covered."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import equicore  # noqa: F401  (registrations)
from equicore.attacks import Attack, build_loss, make_targets
from equicore.defenses import Defense
from equicore.metrics import MetricState
from equicore.registry import (
    ATTACKS,
    DATASETS,
    DEFENSES,
    LOSSES,
    METRICS,
    MODELS,
    TRANSFORMS,
    Registry,
    accepted_params,
    describe,
)
from equicore.transforms import InvertibleTransform
from tests.models_for_tests import TASKS, defense_params_for, make_task

KNOWN_TASKS = {"classification", "segmentation", "instance"}
BATCH_KEYS = {"preds", "labels", "attack_targets", "scores"}
ALL = [TRANSFORMS, ATTACKS, LOSSES, DEFENSES, METRICS, MODELS, DATASETS]


@pytest.mark.parametrize("registry", ALL, ids=lambda r: r.kind)
def test_registry_listing(registry: Registry) -> None:
    names = registry.names()
    assert names == sorted(set(names)) and len(registry) == len(names) and list(registry) == names
    for name in names:
        assert name in registry
        meta = registry.meta(name)
        assert isinstance(meta, dict)
        tasks = meta.get("tasks")
        if tasks is not None:
            assert set(tasks) <= KNOWN_TASKS, (name, tasks)
    assert set(describe(registry)) == set(names)
    assert "definitely-not-registered" not in registry


def test_build_rejects_unknown_parameters_by_signature() -> None:
    reg: Registry = Registry("widget")

    @reg.register("fn")
    def make(a: int, b: int = 2) -> tuple[int, int]:
        return a, b

    @reg.register("dc")
    @dataclasses.dataclass
    class Dc:
        x: int = 1

    @reg.register("kw")
    def anything(**kw):
        return kw

    assert reg.build("fn", a=1) == (1, 2)
    assert accepted_params(make) == {"a", "b"}
    with pytest.raises(ValueError, match=r"widget 'fn' got unknown parameter\(s\) \['c'\]"):
        reg.build("fn", a=1, c=3)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['y'\]"):
        reg.build("dc", y=2)
    assert reg.build("kw", z=1) == {"z": 1}  # **kwargs factories validate themselves


@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_transform_entries(name: str) -> None:
    t = TRANSFORMS.build(name)
    assert isinstance(t, InvertibleTransform) and t.name == name
    repr(t)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_entries(name: str) -> None:
    a = ATTACKS.build(name)
    assert isinstance(a, Attack) and a.name == name
    assert a.loss in LOSSES and a.loss == ATTACKS.meta(name).get("loss", a.loss)
    assert a.steps >= 1 and a.eps >= 0 and a.step_size > 0
    assert json.loads(json.dumps(a.params())) == a.params()
    assert accepted_params(ATTACKS.get(name)) is None or "eps" in accepted_params(ATTACKS.get(name))


def loss_cases() -> list:
    out = []
    for name in LOSSES.names():
        tasks = LOSSES.meta(name).get("tasks", TASKS)
        for task in TASKS:
            marks = () if task in tasks else pytest.mark.skip(reason=f"{name} does not apply to {task}")
            out.append(pytest.param(name, task, marks=marks, id=f"{name}-{task}"))
    return out


@pytest.mark.parametrize("name,task", loss_cases())
def test_loss_entries_are_per_sample_and_differentiable(name: str, task: str) -> None:
    s = make_task(task, n=3)
    for targeted in (False, True):
        # A targeted loss that also needs the ground truth (targeted DLR) declares it as true_labels.
        extra = {"true_labels": s.y} if targeted and "true_labels" in (accepted_params(LOSSES.get(name)) or ()) else {}
        targets = make_targets(s.adapter, s.x, s.y, "next") if targeted and extra else s.y
        fn = build_loss(name, s.adapter, targets, targeted=targeted, **extra)
        x = s.x.clone().requires_grad_(True)
        value = fn(x)
        assert value.shape == (3,) and torch.isfinite(value).all()
        (grad,) = torch.autograd.grad(value.sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        # Per sample: sample 0's loss does not change when sample 1 changes.
        x2 = s.x.clone()
        x2[1] = 1 - x2[1]
        assert torch.equal(fn(x2)[0].detach(), value[0].detach())
        # select(idx): the same loss over a subset of the batch (attacks drop samples already fooled).
        idx = torch.tensor([2, 0])
        assert torch.allclose(fn.select(idx)(s.x[idx]).detach(), value[idx].detach(), atol=1e-6)


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_entries(name: str) -> None:
    d = DEFENSES.build(name)
    assert isinstance(d, Defense) and d.name == name
    assert isinstance(d.randomized, bool) and isinstance(d.optimizes_at_test_time, bool)
    assert json.loads(json.dumps(d.params())) == d.params()
    resolved = d.with_attack_eps(4.0)
    assert type(resolved) is type(d)


def scored_defense_cases() -> list:
    """Defenses with a ``score`` (what the adaptive attack differentiates), on every task."""
    names = [n for n in DEFENSES.names() if callable(getattr(DEFENSES.get(n), "score", None))]
    return [pytest.param(n, t, id=f"{n}-{t}") for n in names for t in TASKS]


@pytest.mark.parametrize("name,task", scored_defense_cases())
def test_defense_scores_are_per_sample_and_differentiable(name: str, task: str, selfsup_heads) -> None:
    s = make_task(task, n=3)
    d = DEFENSES.build(name, **defense_params_for(name, task, selfsup_heads))
    assert d.optimizes_at_test_time
    x = s.x.clone().requires_grad_(True)
    value = d.score(s.adapter, x, 1)
    assert value.shape == (3,) and torch.isfinite(value).all()
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    x2 = s.x.clone()
    x2[1] = 1 - x2[1]
    assert torch.equal(d.score(s.adapter, x2, 1)[0].detach(), value[0].detach())


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_entries(name: str) -> None:
    accepted = accepted_params(METRICS.get(name)) or set()
    m = METRICS.build(name, **({"num_classes": 3} if "num_classes" in accepted else {}))
    assert isinstance(m, MetricState) and m.name == name
    assert m.inputs and set(m.inputs) <= BATCH_KEYS
    d = m.to_dict()
    assert d["type"] == name and json.loads(json.dumps(d)) == d
    assert METRICS.meta(name).get("tasks")
