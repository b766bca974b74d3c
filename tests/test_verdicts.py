"""Verdicts from per-sample rows: the per-image worst case, evaluation draws, intervals and paired deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equicore.attacks.adaptive import BPDALoss
from equicore.attacks.losses import build_loss
from equicore.defenses import build_defense
from equicore.metrics.functional import confusion_matrix, mean_iou
from storage import results as R
from tasks import verdicts as V
from tasks.config import ConfigError, parse_config
from tasks.shard_steps import draw_seeds
from tests.models_for_tests import make_task
from tests.pipeline_helpers import tiny_config


def cls_unit(correct: list[list[float]], ids=None) -> V.UnitSamples:
    arr = np.array(correct, dtype=float)
    return V.UnitSamples(np.array(ids or [f"s{i}" for i in range(len(arr))]), arr, None, None)


def test_classification_worst_is_per_image_not_a_minimum_of_cells() -> None:
    # Three attacks that each break a different image: every cell is 75%, the per-image worst is 25%.
    a = cls_unit([[1], [1], [0], [1]])
    b = cls_unit([[1], [0], [1], [1]])
    c = cls_unit([[1], [1], [1], [0]])
    worst = V.per_image_worst([a, b, c])
    assert worst is not None and worst.correct[:, 0].tolist() == [1, 0, 0, 0]
    assert V.point_value("accuracy", worst) == 0.25
    assert min(V.point_value("accuracy", u) for u in (a, b, c)) == 0.75


def test_worst_counts_an_image_only_if_right_under_every_draw() -> None:
    drawn = cls_unit([[1, 1, 1], [1, 0, 1], [0, 0, 0]])
    assert V.point_value("accuracy", drawn) == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert V.point_value("accuracy_all_draws", drawn) == pytest.approx(1 / 3)
    worst = V.per_image_worst([drawn, cls_unit([[1], [1], [1]])])
    assert worst.correct[:, 0].tolist() == [1, 0, 0]


def seg_unit(preds: list[torch.Tensor], labels: torch.Tensor, classes: int = 3) -> V.UnitSamples:
    """One draw: per-image counts and image mIoU from prediction maps, as the defend step writes them."""
    counts, mious = [], []
    for p, t in zip(preds, labels, strict=True):
        cm = confusion_matrix(p, t, classes, 255)
        counts.append([[cm.diag().tolist(), cm.sum(0).tolist(), cm.sum(1).tolist()]])
        mious.append([mean_iou(cm)])
    ids = np.array([f"s{i}" for i in range(len(preds))])
    return V.UnitSamples(ids, None, np.array(mious, dtype=float), np.array(counts, dtype=float))


def test_segmentation_worst_rebuilds_the_dataset_miou_from_each_images_worst_attack() -> None:
    labels = torch.tensor([[[0, 0], [1, 2]], [[2, 2], [1, 0]]])
    good = labels.clone()
    # Attack A ruins image 0 only, attack B image 1 only.
    a = [torch.tensor([[1, 1], [0, 0]]), good[1]]
    b = [good[0], torch.tensor([[0, 0], [0, 1]])]
    ua, ub = seg_unit(a, labels), seg_unit(b, labels)
    worst = V.per_image_worst([ua, ub])
    # By hand: the dataset confusion matrix of A's image 0 and B's image 1.
    expected = mean_iou(confusion_matrix(a[0], labels[0], 3, 255) + confusion_matrix(b[1], labels[1], 3, 255))
    assert V.point_value("miou", worst) == pytest.approx(expected)
    assert V.point_value("miou", worst) < min(V.point_value("miou", ua), V.point_value("miou", ub))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_worst_row_never_exceeds_any_single_attack(data) -> None:
    n, attacks, draws = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    rng = np.random.default_rng(data.draw(st.integers(0, 10_000)))
    units = [cls_unit(rng.integers(0, 2, size=(n, draws)).tolist()) for _ in range(attacks)]
    worst = V.per_image_worst(units)
    assert all(V.point_value("accuracy", worst) <= V.point_value("accuracy", u) for u in units)
    labels = torch.from_numpy(rng.integers(0, 3, size=(n, 3, 3)))
    seg = [seg_unit([torch.from_numpy(rng.integers(0, 3, size=(3, 3))) for _ in range(n)], labels) for _ in range(2)]
    seg_worst = V.per_image_worst(seg)
    assert all(V.point_value("miou", seg_worst) <= V.point_value("miou", u) + 1e-12 for u in seg)


def test_paired_delta_is_zero_on_identical_cells_and_needs_the_same_images() -> None:
    u = cls_unit([[1], [0], [1], [1]])
    iv = V.delta_interval("accuracy", u, u, seed=0)
    assert (iv.value, iv.low, iv.high) == (0.0, 0.0, 0.0)
    other = cls_unit([[1], [0], [1], [1]], ids=["a", "b", "c", "d"])
    assert V.delta_interval("accuracy", u, other, seed=0) is None


def test_eval_draws_are_disjoint_from_the_attackers_eot_draws() -> None:
    """The defense's evaluation draws and BPDA's EOT draws come from different streams: no noise is shared."""
    s = make_task("classification", n=3)
    defense = build_defense("random_noise", eps_v=16)
    defense_seeds = [11, 12, 13]  # what the pipeline derives per image for the defense
    evaluated = [defense.purify(s.adapter, s.x, draw_seeds(defense_seeds, r)) for r in range(4)]
    seen: list[torch.Tensor] = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def purify(self, adapter, x, seeds):
            out = self.inner.purify(adapter, x, seeds)
            seen.append(out.detach())
            return out

        randomized = True

    loss = BPDALoss(build_loss("ce", s.adapter, s.y), Spy(defense), s.adapter, [21, 22, 23], eot=3)
    for _ in range(3):
        loss(s.x.clone().requires_grad_(True))
    assert len(seen) == 9
    for e in evaluated:
        assert not any(torch.equal(e, a) for a in seen)
    assert not torch.equal(evaluated[0], evaluated[1])  # and the evaluation draws differ from each other


def run_tiny(tmp_path, **over):
    from flows.pipeline import run

    cfg = parse_config(tiny_config(tmp_path, cluster={"in_process": True, "torch_threads": 1}, **over))
    summary = run(cfg)
    return cfg, R.read_results_table(cfg.results_dir, summary.run_id).to_pylist()


VERDICT_COLUMNS = ("value", "ci_low", "ci_high", "delta", "delta_ci_low", "delta_ci_high", "n_draws")


def verdicts(rows):
    return sorted(
        (r["attack"], r["defense"], r["metric"], *(r[c] for c in VERDICT_COLUMNS))
        for r in rows
        if r["metric"] in ("accuracy", "accuracy_all_draws")
    )


@pytest.mark.pipeline
def test_pipeline_verdicts_are_the_same_for_any_sharding(tmp_path) -> None:
    common = dict(
        attacks=[
            {"name": "clean"},
            {"name": "pgd", "eps": 48, "step_size": 16, "steps": 2},
            {"name": "fgsm", "eps": 48},
        ],
        defenses=[{"name": "vanilla"}, {"name": "random_noise", "eps_v": 16, "eval_draws": 3}],
        worst_case=True,
    )
    _, one = run_tiny(tmp_path / "a", shard_size=20, batch_size=5, **common)
    _, four = run_tiny(tmp_path / "b", shard_size=5, batch_size=5, **common)
    assert verdicts(one) == verdicts(four)
    by = {(r["attack"], r["defense"], r["metric"]): r for r in one}
    for defense in ("vanilla", "random_noise"):
        worst = by[("worst", defense, "accuracy")]
        assert all(worst["value"] <= by[(a, defense, "accuracy")]["value"] for a in ("clean", "pgd", "fgsm"))
        assert worst["ci_low"] <= worst["value"] <= worst["ci_high"]
    noisy = by[("pgd", "random_noise", "accuracy")]
    assert noisy["n_draws"] == 3 and noisy["delta"] == pytest.approx(
        noisy["value"] - by[("pgd", "vanilla", "accuracy")]["value"]
    )
    assert by[("pgd", "random_noise", "accuracy_all_draws")]["value"] <= noisy["value"]
    assert ("worst", "vanilla", "accuracy") in by and by[("pgd", "vanilla", "accuracy")]["delta"] is None


@pytest.mark.pipeline
def test_worst_case_with_a_single_attack_equals_it(tmp_path) -> None:
    _, rows = run_tiny(
        tmp_path,
        attacks=[{"name": "fgsm", "eps": 48}],
        defenses=[{"name": "vanilla"}],
        worst_case=True,
    )
    by = {(r["attack"], r["metric"]): r for r in rows}
    assert by[("worst", "accuracy")]["value"] == by[("fgsm", "accuracy")]["value"]
    assert by[("worst", "accuracy")]["ci_low"] == by[("fgsm", "accuracy")]["ci_low"]


@pytest.mark.parametrize(
    "over,message",
    [
        ({"defenses": [{"name": "random_noise", "eval_draws": 0}]}, "defenses.0.eval_draws"),
        ({"attacks": [{"name": "apgd", "loss": "masked_ce"}]}, "not defined for classification"),
        ({"attacks": [{"name": "apgd", "step_size": 2}]}, "sets its own step size"),
        ({"suite": {"name": "strongest", "eps": 8}}, "suite: name"),
        ({"suite": {"name": "standard", "eps": 0}}, "suite: eps"),
    ],
)
def test_bad_verdict_input_is_one_clear_error(tmp_path, over, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(tiny_config(tmp_path, **over))


def test_square_on_a_segmentation_model_is_refused_at_load(tmp_path) -> None:
    cfg = tiny_config(tmp_path, attacks=[{"name": "square", "eps": 8}])
    cfg["model"] = {"name": "drn_tiny_seg"}
    cfg["dataset"] = {"name": "fashion_scenes", "params": {"split": "test"}, "limit": 2}
    with pytest.raises(ConfigError, match=r"attacks.0 \(square\): defined for \['classification'\] models"):
        parse_config(cfg)


def test_standard_suite_expands_per_task_and_turns_on_the_worst_case(tmp_path) -> None:
    cfg = parse_config(tiny_config(tmp_path, suite={"name": "standard", "eps": 8}, attacks=[]))
    names = [a.name for a in cfg.attacks]
    # The tiny config's equivariance defense optimises at test time: AutoAttack's 'rand' additions come along.
    assert names == ["clean", "apgd", "apgd_t", "square", "bpda", "aa"] and cfg.worst_case
    plain = parse_config(
        tiny_config(tmp_path, suite={"name": "standard", "eps": 8}, attacks=[], defenses=[{"name": "vanilla"}])
    )
    assert [a.name for a in plain.attacks] == ["clean", "apgd", "apgd_t", "square"]


def run_scenes(tmp_path, dataset: str, model: str, attacks: list, defenses: list, metric: str, n: int):
    """A small scene run (in process) with the per-image worst case on; its rows of ``metric``."""
    from flows.pipeline import run

    cfg = tiny_config(
        tmp_path,
        dataset={"name": dataset, "params": {"split": "test"}, "limit": n},
        model={"name": model},
        attacks=attacks,
        defenses=defenses,
        measure={"enabled": False},
        worst_case=True,
        shard_size=n // 2 if n % 2 == 0 else n,
        batch_size=n // 2 if n % 2 == 0 else n,
        cluster={"in_process": True, "torch_threads": 1},
    )
    summary = run(parse_config(cfg))
    return [r for r in R.read_results_table(cfg["results_dir"], summary.run_id).to_pylist() if r["metric"] == metric]


@pytest.mark.pipeline
def test_segmentation_run_gets_the_per_image_worst_and_intervals(tmp_path) -> None:
    attacks = [
        {"name": "clean"},
        {"name": "apgd", "eps": 8, "steps": 2, "loss": "masked_ce"},
        {"name": "apgd", "eps": 8, "steps": 2, "loss": "js"},
    ]
    rows = run_scenes(tmp_path, "fashion_scenes", "drn_tiny_seg", attacks, [{"name": "vanilla"}], "miou", 4)
    worst = next(r for r in rows if r["attack"] == "worst")
    singles = [r for r in rows if r["attack"] != "worst"]
    assert len(singles) == 3 and all(worst["value"] <= r["value"] + 1e-12 for r in singles)
    assert all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in rows)


@pytest.mark.pipeline
def test_targeted_segmentation_gets_intervals_on_the_miou_to_target(tmp_path) -> None:
    """Table 3's second metric carries its interval and paired delta like mIoU (per-image counts against the
    attack's target map, over every evaluation draw)."""
    attacks = [{"name": "pgd", "eps": 8, "step_size": 8, "steps": 1, "targeted": True, "target": "next"}]
    defenses = [{"name": "vanilla"}, {"name": "random_noise", "eval_draws": 2}]
    rows = run_scenes(tmp_path, "fashion_scenes", "drn_tiny_seg", attacks, defenses, "miou_to_target", 4)
    by = {r["defense"]: r for r in rows if r["attack"] == "pgd"}
    assert set(by) == {"vanilla", "random_noise"}
    for r in by.values():
        assert r["ci_low"] is not None and r["ci_low"] - 1e-12 <= r["value"] <= r["ci_high"] + 1e-12
        assert r["ci_high"] > r["ci_low"]  # 4 different scenes: the resamples differ
    noisy = by["random_noise"]
    assert noisy["n_draws"] == 2 and noisy["delta_ci_low"] <= noisy["delta"] <= noisy["delta_ci_high"]
    assert noisy["delta"] == pytest.approx(noisy["value"] - by["vanilla"]["value"], abs=1e-9)


@pytest.mark.pipeline
def test_instance_run_gets_mask_ap_intervals_deltas_and_the_per_image_worst(tmp_path) -> None:
    attacks = [{"name": "clean"}, {"name": "pgd", "eps": 8, "step_size": 8, "steps": 1}]
    defenses = [{"name": "vanilla"}, {"name": "random_noise", "eval_draws": 2}]
    rows = run_scenes(tmp_path, "fashion_scenes_instances", "maskrcnn_small", attacks, defenses, "mask_ap", 3)
    by = {(r["attack"], r["defense"]): r for r in rows}
    for defense in ("vanilla", "random_noise"):
        worst = by[("worst", defense)]
        assert all(worst["value"] <= by[(a, defense)]["value"] + 1e-12 for a in ("clean", "pgd"))
    for r in rows:
        assert r["ci_low"] <= r["value"] + 1e-12 and r["value"] <= r["ci_high"] + 1e-12
    noisy = by[("pgd", "random_noise")]
    assert noisy["n_draws"] == 2
    assert noisy["delta"] == pytest.approx(noisy["value"] - by[("pgd", "vanilla")]["value"])


def test_square_below_every_gradient_attack_flags_gradient_masking() -> None:
    def row(ai, di, value, attack="x"):
        return {"metric": "accuracy", "attack": attack, "attack_index": ai, "defense_index": di, "value": value}

    rows = [
        row(0, 0, 1.0, "clean"),
        row(1, 0, 0.30),  # a gradient attack on defense 0
        row(2, 0, 0.10),  # Square on defense 0: lower than every gradient attack
        row(1, 1, 0.05),
        row(2, 1, 0.10),  # Square on defense 1: not lower
        row(-1, 0, 0.0, "worst"),
    ]
    flags = V.square_masking(rows, square_attacks={2}, metric="accuracy")
    assert flags == {0: V.SQUARE_MASKING}
