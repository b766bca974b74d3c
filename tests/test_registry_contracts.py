"""Contracts every registry entry must meet; parametrized over the registries so new entries are covered (the
engine's registries are ``equicore.REGISTRIES``)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable

import pytest
import torch

import equicore
from equicore.adapters import ADAPTERS, TaskAdapter
from equicore.attacks import Attack, build_loss, make_targets
from equicore.code_identity import module_file
from equicore.datasets import SampleDataset
from equicore.defenses import STEP_SCHEDULES, Defense, StepSchedule, build_schedule
from equicore.defenses.schedules import schedule_spec
from equicore.equivariance import OBJECTIVES, sample_view_params, view_features
from equicore.errors import RegistrationError, UnknownNameError
from equicore.metrics import MetricState
from equicore.registry import (
    ATTACKS,
    DEFENSES,
    LOSSES,
    METRICS,
    TRANSFORMS,
    Registry,
    accepted_params,
    declared_return_class,
    describe,
)
from equicore.transforms import VIEW_SETS, InvertibleTransform
from tests.models_for_tests import TASKS, defense_params_for, make_task

KNOWN_TASKS = {"classification", "segmentation", "instance"}
BATCH_KEYS = {"preds", "labels", "attack_targets", "scores"}
ALL = list(equicore.REGISTRIES.values())
BASES = {
    "adapters": TaskAdapter,
    "attacks": Attack,
    "datasets": SampleDataset,
    "defenses": Defense,
    "metrics": MetricState,
    "models": torch.nn.Module,
    "schedules": StepSchedule,
    "transforms": InvertibleTransform,
    "views": list,
}
ENTRIES = [pytest.param(r, n, id=f"{kind}-{n}") for kind, r in equicore.REGISTRIES.items() for n in r.names()]


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
    if names:
        assert registry[names[0]] is registry.get(names[0])
        with pytest.raises(UnknownNameError, match=re.escape(f"did you mean {names[0]!r}")):
            registry[names[0] + "x"]


def test_every_registry_is_listed_with_its_base_class() -> None:
    assert set(equicore.REGISTRIES) == {*BASES, "losses", "objectives"}
    for kind, base in BASES.items():
        assert equicore.REGISTRIES[kind].base_cls is base, kind
    assert LOSSES.base_cls is Callable and OBJECTIVES.base_cls is None


@pytest.mark.parametrize("registry,name", ENTRIES)
def test_entry_is_of_its_registry_base_class(registry: Registry, name: str) -> None:
    base, factory = registry.base_cls, registry.get(name)
    assert callable(factory)
    if base is None:
        return
    if isinstance(factory, type):
        assert issubclass(factory, base)
    else:
        returned = declared_return_class(factory)
        assert returned is None or issubclass(returned, base)


@pytest.mark.parametrize("registry,name", ENTRIES)
def test_entry_has_a_version_and_a_code_identity(registry: Registry, name: str) -> None:
    version = registry.meta(name)["version"]
    assert isinstance(version, str) and version and registry.version(name) == version
    modules = registry.modules(name)
    assert modules[0] == registry.get(name).__module__ and len(set(modules)) == len(modules)
    for module in modules:
        assert module.startswith("equicore.") and module_file(module).endswith(".py"), module
    assert re.fullmatch(re.escape(version) + r":[0-9a-f]{16}", registry.code_version(name))


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


# ------------------------------------------------------------------------------------------ typed registration


class Widget:
    pass


class Gadget(Widget):
    pass


def test_a_typed_registry_refuses_what_it_does_not_hold() -> None:
    reg: Registry = Registry("widget", base_cls=Widget)
    reg.register("gadget", colour="red")(Gadget)
    with pytest.raises(RegistrationError, match=r"widget 'int': class int is not a subclass of Widget"):
        reg.register("int")(int)

    def makes_a_string() -> str:
        return "x"

    with pytest.raises(RegistrationError, match=r"widget 'text': factory .*makes_a_string.* returns str, not a Widget"):
        reg.register("text")(makes_a_string)
    with pytest.raises(RegistrationError, match=r"widget 'seven': expected a class or a factory function, got 7"):
        reg.add("seven", 7)  # type: ignore[arg-type]
    assert "int" not in reg and "text" not in reg and reg.names() == ["gadget"]

    # A factory without a return annotation is checked on what it builds.
    reg.register("lying")(lambda: "not a widget")
    with pytest.raises(RegistrationError, match=r"widget 'lying' built a str, not a Widget"):
        reg.build("lying")

    @reg.register("annotated", version="2", modules=("equicore.seeding",))
    def make() -> Gadget:
        return Gadget()

    assert isinstance(reg.build("annotated"), Gadget)
    assert reg.meta("gadget") == {"colour": "red", "version": "1"} and reg.version("annotated") == "2"
    assert reg.modules("annotated") == (__name__, "equicore.seeding")


def test_registration_checks_versions_modules_and_names() -> None:
    reg: Registry = Registry("widget")
    for bad in ("", True, 1.5, None):
        with pytest.raises(RegistrationError, match="version must be a non-empty string"):
            reg.register("a", version=bad)(lambda: 1)  # type: ignore[arg-type]
    with pytest.raises(RegistrationError, match="modules must be import names"):
        reg.register("b", modules=("equicore/seeding.py",))(lambda: 1)
    with pytest.raises(RegistrationError, match="non-empty strings"):
        reg.register("")(lambda: 1)
    assert len(reg) == 0
    reg.register("a", version=2)(lambda: 1)
    assert reg.version("a") == "2" == reg.meta("a")["version"] and reg.code_version("a").startswith("2:")


def test_an_untyped_registry_keeps_the_old_api() -> None:
    reg: Registry = Registry("widget")
    assert reg.base_cls is None
    reg.register("one", tasks=("classification",))(lambda: 1)
    assert reg.build("one") == 1 and reg.meta("one")["tasks"] == ("classification",)
    assert list(reg) == ["one"] and "one" in reg and describe(reg) == {"one": reg.meta("one")}


def test_a_base_class_named_by_import_path_is_resolved_on_first_use() -> None:
    reg: Registry = Registry("widget", base_cls="equicore.transforms.base:InvertibleTransform")
    assert reg.base_cls is InvertibleTransform
    broken: Registry = Registry("widget", base_cls="equicore.transforms.base:Nope")
    with pytest.raises(RegistrationError, match="cannot resolve its base class"):
        broken.register("x")(lambda: 1)


# --------------------------------------------------------------------------- adapters, view sets, objectives


@pytest.mark.parametrize("name", ADAPTERS.names())
def test_adapter_entries(name: str) -> None:
    cls = ADAPTERS.get(name)
    assert issubclass(cls, TaskAdapter) and cls.task == name
    if name in TASKS:
        s = make_task(name, n=2)
        adapter = ADAPTERS.build(name, model=s.adapter.model)
        loss = adapter.task_loss(s.x, s.y)
        assert loss.shape == (2,) and adapter.features(s.x).shape[0] == 2


@pytest.mark.parametrize("name", VIEW_SETS.names())
def test_view_set_entries(name: str) -> None:
    views = VIEW_SETS.build(name)
    assert views and all(isinstance(v, InvertibleTransform) for v in views)
    assert VIEW_SETS.build(name) is not views  # a fresh list per build


@pytest.mark.parametrize("name", OBJECTIVES.names())
@pytest.mark.parametrize("task", TASKS)
def test_objective_entries_are_per_sample_and_differentiable(name: str, task: str) -> None:
    s = make_task(task, n=3)
    views = VIEW_SETS.build("paper")
    params = sample_view_params(views, 0, tuple(s.x.shape[-2:]))
    x = s.x.clone().requires_grad_(True)
    value = OBJECTIVES[name](view_features(s.adapter.features, x, views, params))
    assert value.shape == (3,) and torch.isfinite(value).all()
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", STEP_SCHEDULES.names())
def test_step_schedule_entries(name: str) -> None:
    """A factor on eta: 1 at the first step, positive, never rising; its config value rebuilds it."""
    schedule = STEP_SCHEDULES.build(name)
    assert isinstance(schedule, StepSchedule) and schedule.name == name
    for steps in (1, 2, 7, 20):
        factors = [schedule.factor(t, steps) for t in range(steps)]
        assert factors[0] == 1.0 and all(0 < f <= 1 for f in factors), (steps, factors)
        assert all(b <= a for a, b in zip(factors, factors[1:], strict=False)), (steps, factors)
    spec = schedule_spec(schedule)
    assert json.loads(json.dumps(spec)) == spec and build_schedule(spec) == schedule
    assert spec == name or spec["name"] == name
