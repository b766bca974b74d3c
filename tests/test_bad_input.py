"""Bad input fails early with an ``EquirobustError`` whose message names the problem."""

from __future__ import annotations

import pytest
import torch

import equicore  # noqa: F401  (registrations)
from equicore.adapters import ClassificationAdapter, SegmentationAdapter, build_adapter
from equicore.attacks import build_attack, build_loss, projected_gradient, run_attack
from equicore.defenses import build_defense
from equicore.errors import EquirobustError, InvalidInputError, UnknownNameError
from equicore.metrics import AccuracyState, ConfusionState, MeanScoreState, confusion_matrix
from equicore.registry import ATTACKS, DATASETS, DEFENSES, LOSSES, METRICS, MODELS, TRANSFORMS, Registry
from equicore.transforms import ColorJitter, Compose, Resize, Rotate, build_views
from equicore.transforms.views import build_transform
from tests.models_for_tests import TinyClassifier, make_task, seeded_model

REGISTRIES = [TRANSFORMS, ATTACKS, LOSSES, DEFENSES, METRICS, MODELS, DATASETS]


def raises(match: str):
    """The error is an EquirobustError and its message matches."""
    return pytest.raises(EquirobustError, match=match)


def bad_images() -> dict[str, tuple[torch.Tensor, str]]:
    x = torch.rand(2, 3, 16, 16)
    nan = x.clone()
    nan[0, 1, 2, 3] = float("nan")
    return {
        "3-D": (x[0], r"expected shape B x C x H x W, got \(3, 16, 16\)"),
        "above 1": (x * 2, r"values must lie in \[0, 1\]"),
        "below 0": (x - 0.5, r"values must lie in \[0, 1\]"),
        "NaN": (nan, r"1 NaN/Inf value"),
        "int": ((x * 255).to(torch.uint8), "floating-point"),
        "empty": (torch.zeros(0, 3, 16, 16), "empty batch"),
    }


@pytest.mark.parametrize("case", sorted(bad_images()))
def test_attacks_reject_bad_images(case: str) -> None:
    x, message = bad_images()[case]
    s = make_task("classification", n=2)
    with raises(message):
        run_attack(build_attack("pgd", steps=1), s.adapter, x, s.y[: max(1, x.shape[0])] if x.ndim == 4 else s.y)
    with raises(message):
        projected_gradient(lambda z: z.flatten(1).sum(1), x, eps=4, step_size=1, steps=1)


@pytest.mark.parametrize("case", sorted(bad_images()))
@pytest.mark.parametrize("name", DEFENSES.names())
def test_defenses_reject_bad_images(case: str, name: str) -> None:
    x, message = bad_images()[case]
    s = make_task("segmentation", n=2)
    defense = DEFENSES.build(name).with_attack_eps(8)
    with raises(message):
        defense.purify(s.adapter, x)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_labels_of_wrong_batch_size(task: str) -> None:
    s = make_task(task, n=4)
    with raises(r"labels: batch size 3 does not match images' 4"):
        run_attack(build_attack("pgd", steps=1), s.adapter, s.x, s.y[:3])


def test_attack_input_checks_precede_label_checks() -> None:
    """A 3-D image is reported as such, not as a label batch-size mismatch."""
    s = make_task("classification", n=3)
    with raises("attack input: expected shape B x C x H x W"):
        run_attack(build_attack("pgd", steps=1), s.adapter, s.x[0], s.y)


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.kind)
def test_unknown_names_suggest_a_close_match(registry: Registry) -> None:
    if not len(registry):
        pytest.skip(f"no {registry.kind} registered yet")
    real = max(registry.names(), key=len)  # one wrong letter in a long name is unambiguous
    typo = real[:-1] + ("x" if real[-1] != "x" else "y")
    for lookup in (registry.get, registry.build, registry.meta):
        with pytest.raises(UnknownNameError) as info:
            lookup(typo)
        msg = str(info.value)
        assert typo in msg and f"did you mean {real!r}" in msg and registry.kind in msg
    with pytest.raises(UnknownNameError, match="known: "):
        registry.get("zzzz-nothing-like-it")


def test_unknown_names_through_helpers() -> None:
    with raises("unknown attack 'pgdd'; did you mean 'pgd'"):
        build_attack("pgdd")
    with raises("unknown defense 'equivarance'; did you mean 'equivariance'"):
        build_defense("equivarance")
    s = make_task("classification")
    with raises("unknown attack loss 'cee'; did you mean 'ce'"):
        build_loss("cee", s.adapter, s.y)
    with raises("unknown attack loss 'cww'"):
        build_attack("pgd", loss="cww")
    with raises("unknown task adapter 'segmentaton'; did you mean 'segmentation'"):
        build_adapter("segmentaton", seeded_model(TinyClassifier, 0))
    with raises("unknown transform 'rotat'; did you mean 'rotate'"):
        build_views(["hflip", "rotat"])
    with raises("views: unknown view set 'papr'"):
        build_views("papr")


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_budget_and_steps_are_validated(name: str) -> None:
    with raises(f"{name}.eps: expected >= 0"):
        build_attack(name, eps=-1)
    with raises(f"{name}.eps"):
        build_attack(name, eps=float("nan"))
    with raises(f"{name}.step_size"):
        build_attack(name, step_size=-0.5)
    with raises(f"{name}.steps: expected an integer >= 1, got 0"):
        build_attack(name, steps=0)
    with raises(f"{name}.steps"):
        build_attack(name, steps=2.5)
    with raises(f"{name}.norm: expected one of"):
        build_attack(name, norm="l1")
    with raises(f"{name}.momentum"):
        build_attack(name, momentum=-1.0)
    with raises(f"{name}.target"):
        build_attack(name, target="random")


@pytest.mark.parametrize("build", [build_attack, ATTACKS.build], ids=["build_attack", "ATTACKS.build"])
@pytest.mark.parametrize("name", ATTACKS.names())
def test_unknown_attack_parameters(build, name: str) -> None:
    with raises(rf"attack '{name}' got unknown parameter\(s\) \['epss'\]; it accepts \[.*'eps'"):
        build(name, epss=8)


@pytest.mark.parametrize("name", DEFENSES.names())
def test_unknown_defense_parameters(name: str) -> None:
    with raises(rf"defense '{name}' got unknown parameter\(s\) \['stepz'\]"):
        DEFENSES.build(name, stepz=3)


@pytest.mark.parametrize("name", ["equivariance", "invariance"])
def test_consistency_defense_parameters_are_validated(name: str) -> None:
    with raises(f"{name}.steps: expected an integer >= 1, got 0"):
        build_defense(name, steps=0)
    with raises(f"{name}.eps_v"):
        build_defense(name, eps_v=-1.0)
    with raises(f"{name}.eta"):
        build_defense(name, eta=-1.0)
    with raises(f"{name}.eps_v_factor"):
        build_defense(name, eps_v_factor=-1.0)
    with raises(f"{name}.objective"):
        build_defense(name, objective="contrastive")
    with raises(f"{name}.grad_norm"):
        build_defense(name, grad_norm="l1")
    with raises(f"{name}.max_batch_pixels"):
        build_defense(name, max_batch_pixels=0)
    with raises("unknown transform 'flipp'"):
        build_defense(name, views=["flipp"])
    with raises("random_noise.eps_v"):
        build_defense("random_noise", eps_v=-2.0)


def test_loss_task_mismatch() -> None:
    s = make_task("classification")
    with raises("attack loss 'houdini' is not defined for task 'classification'"):
        build_loss("houdini", s.adapter, s.y)
    with raises("houdini"):
        run_attack(build_attack("houdini", steps=1), s.adapter, s.x, s.y)
    with raises("cw.kappa"):
        build_loss("cw", s.adapter, s.y, kappa=-1.0)


def test_adapter_errors() -> None:
    model = seeded_model(TinyClassifier, 0)
    with raises("feature_layer 'conv9' is not a module of the model; known: .*conv2"):
        ClassificationAdapter(model, feature_layer="conv9")
    adapter = ClassificationAdapter(model, num_classes=10)
    with raises("model outputs 4 classes but the dataset has 10"):
        adapter.logits(torch.rand(1, 3, 8, 8))
    seg = make_task("segmentation")
    wrong = SegmentationAdapter(seg.adapter.model, num_classes=7)
    with raises("model outputs 4 classes but the dataset has 7"):
        wrong.predict(seg.x)


def test_transform_parameters_are_validated() -> None:
    with raises(r"rotate.degrees: expected a number or a \[low, high\] range"):
        Rotate((10.0, -10.0))
    with raises("resize.scale: factors must be > 0"):
        Resize((0.0, 1.0))
    with raises("resize.aspect_jitter"):
        Resize(aspect_jitter=1.5)
    with raises("color_jitter.brightness"):
        ColorJitter(brightness=1.0)
    with raises("color_jitter.grayscale_p"):
        ColorJitter(grayscale_p=2.0)
    with raises("compose: needs at least one transform"):
        Compose([])
    with raises("view: expected a transform name or a mapping with 'name'"):
        build_transform({"degrees": 3})
    with raises(r"transform 'rotate' got unknown parameter\(s\) \['degree'\]"):
        build_transform({"name": "rotate", "degree": 3})
    with raises("features: expected B x D or B x D x h x w"):
        Rotate().inverse(torch.zeros(2, 3, 4), {"angle": 1.0, "in_size": (4, 4)})


def test_metric_inputs_are_validated() -> None:
    with raises("metric 'accuracy' needs 'labels' in the batch"):
        AccuracyState().update({"preds": torch.zeros(3)})
    with raises(r"accuracy: preds \(3,\) vs labels \(2,\)"):
        AccuracyState().update({"preds": torch.zeros(3), "labels": torch.zeros(2)})
    with raises(r"target labels must lie in \[0, 3\)"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 3]), 3, ignore_index=255)
    with raises(r"predicted labels must lie in \[0, 3\)"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)
    with raises("differ in shape"):
        ConfusionState(3).update({"preds": torch.zeros(2, 4, 4), "labels": torch.zeros(2, 4, 5)})
    with raises("miou.num_classes"):
        ConfusionState(0)
    with raises("equivariance_score: scores contain NaN"):
        MeanScoreState().update({"scores": torch.tensor([0.5, float("nan")])})
    with raises("metric 'miou_to_target' needs 'attack_targets'"):
        METRICS.build("miou_to_target", num_classes=3).update({"preds": torch.zeros(1, 2, 2), "labels": None})


def test_registering_a_name_twice_is_refused() -> None:
    reg: Registry = Registry("widget")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a")(lambda: 2)


def test_wrong_number_of_seeds() -> None:
    s = make_task("classification", n=3)
    with pytest.raises(InvalidInputError, match="seeds: got 2 seeds for a batch of 3"):
        run_attack(build_attack("pgd", steps=1), s.adapter, s.x, s.y, seeds=[1, 2])
