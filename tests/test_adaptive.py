"""Defense-aware attacks: BPDA (+EOT) and the adaptive attack AA (paper eq. 6), in the engine and the pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import equicore  # noqa: F401  (registrations)
from equicore.attacks import build_attack, build_loss, run_attack
from equicore.attacks.adaptive import adaptive_loss, bpda_loss
from equicore.defenses import build_defense
from equicore.errors import InvalidInputError
from equicore.registry import DEFENSES
from flows.pipeline import run
from reports.tables import report
from storage import results as R
from tasks.config import ConfigError, parse_config
from tests.models_for_tests import defense_params_for, make_task
from tests.pipeline_helpers import tiny_config

SEEDS = [11, 22, 33, 44]


def grad_of(loss_fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(x).sum(), x)
    return g


@dataclasses.dataclass
class RecordingDefense:
    """Wraps a defense and records every purified batch, so tests can recompute BPDA's gradient by hand."""

    inner: object
    outputs: list = dataclasses.field(default_factory=list)

    @property
    def randomized(self) -> bool:
        return self.inner.randomized

    def purify(self, adapter, x, seeds=None):
        out = self.inner.purify(adapter, x, seeds)
        self.outputs.append(out)
        return out


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_aa_gradient_flows_through_the_equivariance_term(task: str) -> None:
    s = make_task(task)
    defense = build_defense("equivariance", steps=2, views="flip", eps_v=4.0)
    task_loss = build_loss("ce", s.adapter, s.y)
    pgd_grad = grad_of(task_loss, s.x)
    same = grad_of(adaptive_loss(task_loss, defense, s.adapter, 0.0), s.x)
    assert torch.equal(same, pgd_grad)  # lambda_e = 0 is plain PGD
    aa_grad = grad_of(adaptive_loss(task_loss, defense, s.adapter, 5.0), s.x)
    # The official-code bug (equivariance term on the unperturbed image) would make these equal.
    assert not torch.allclose(aa_grad, pgd_grad)
    term = grad_of(lambda x: defense.score(s.adapter, x, 0), s.x)
    assert term.abs().sum() > 0
    torch.testing.assert_close(aa_grad, pgd_grad + 5.0 * term, rtol=1e-4, atol=1e-6)


def test_aa_uses_equivariance_for_defenses_without_an_objective() -> None:
    s = make_task("classification")
    task_loss = build_loss("ce", s.adapter, s.y)
    aa = grad_of(adaptive_loss(task_loss, build_defense("vanilla"), s.adapter, 5.0), s.x)
    assert not torch.allclose(aa, grad_of(task_loss, s.x))


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_bpda_gradient_is_the_task_gradient_at_the_purified_image(task: str) -> None:
    s = make_task(task)
    defense = RecordingDefense(build_defense("equivariance", steps=3, views="flip", eps_v=8.0, noise=False))
    task_loss = build_loss("ce", s.adapter, s.y)
    g = grad_of(bpda_loss(task_loss, defense, s.adapter, SEEDS, eot=4), s.x)
    assert len(defense.outputs) == 1  # deterministic defense: one purification per step whatever eot says
    purified = defense.outputs[0]
    assert not torch.equal(purified, s.x)
    torch.testing.assert_close(g, grad_of(task_loss, purified))
    assert not torch.allclose(g, grad_of(task_loss, s.x))  # and not the gradient at the attacked input


def test_eot_averages_n_independent_draws() -> None:
    s = make_task("classification")
    defense = RecordingDefense(build_defense("random_noise", eps_v=16.0))
    task_loss = build_loss("ce", s.adapter, s.y)
    g = grad_of(bpda_loss(task_loss, defense, s.adapter, SEEDS, eot=3), s.x)
    assert len(defense.outputs) == 3
    a, b, c = defense.outputs
    assert not torch.equal(a, b) and not torch.equal(b, c)  # three different draws of the defense's noise
    expected = sum(grad_of(task_loss, p) for p in defense.outputs) / 3
    torch.testing.assert_close(g, expected)


def test_bpda_draws_new_randomness_each_step_and_repeats_under_a_seed() -> None:
    s = make_task("classification")
    defense = RecordingDefense(build_defense("random_noise", eps_v=16.0))
    loss = bpda_loss(build_loss("ce", s.adapter, s.y), defense, s.adapter, SEEDS, eot=1)
    loss(s.x)
    loss(s.x)
    assert not torch.equal(defense.outputs[0], defense.outputs[1])
    attack = build_attack("bpda", eps=8, steps=2, eot=2)
    noisy = build_defense("random_noise", eps_v=8.0)
    x1 = run_attack(attack, s.adapter, s.x, s.y, SEEDS, defense=noisy).x_adv
    x2 = run_attack(attack, s.adapter, s.x, s.y, SEEDS, defense=noisy).x_adv
    assert torch.equal(x1, x2)


def test_bpda_breaks_a_purely_random_defense_better_than_pgd_through_its_noise() -> None:
    """Sanity: BPDA+EOT against random noise is at least as strong as PGD on the undefended model, scored through
    the defense (a defense that only masks gradients must not look robust under BPDA)."""
    s = make_task("classification", n=8)
    noisy = build_defense("random_noise", eps_v=4.0)
    attack = build_attack("bpda", eps=16, steps=5, step_size=4, eot=2, optimizer="pgd")
    x_adv = run_attack(attack, s.adapter, s.x, s.y, list(range(8)), defense=noisy).x_adv
    with torch.no_grad():
        clean_acc = (s.adapter.predict(noisy.purify(s.adapter, s.x, list(range(8)))) == s.y).float().mean()
        adv_acc = (s.adapter.predict(noisy.purify(s.adapter, x_adv, list(range(8)))) == s.y).float().mean()
    assert adv_acc < clean_acc


def test_adaptive_attack_parameters_are_validated() -> None:
    with pytest.raises(InvalidInputError, match=r"aa.lambda_e: expected a finite value >= 0, got -1"):
        build_attack("aa", lambda_e=-1)
    with pytest.raises(InvalidInputError, match="bpda.eot: expected an integer >= 1, got 0"):
        build_attack("bpda", eot=0)
    with pytest.raises(InvalidInputError, match="pgd.eot: only BPDA"):
        build_attack("pgd", eot=4)
    with pytest.raises(InvalidInputError, match="pgd.lambda_e: only the adaptive attack"):
        build_attack("pgd", lambda_e=1.0)
    with pytest.raises(InvalidInputError, match=r"unknown parameter\(s\) \['adaptive'\]"):
        build_attack("pgd", adaptive="bpda")
    s = make_task("classification")
    with pytest.raises(InvalidInputError, match="attack 'bpda' is defense-aware: pass the defense it attacks"):
        run_attack(build_attack("bpda", steps=1), s.adapter, s.x, s.y, SEEDS)


def test_config_rejects_attacks_not_defined_for_the_task_and_bad_sweeps(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"attacks.1 \(houdini\): loss 'houdini' is not defined for classification"):
        parse_config(tiny_config(tmp_path, attacks=[{"name": "clean"}, {"name": "houdini"}]))
    with pytest.raises(ConfigError, match="lambda_e: expected a finite value >= 0, got -0.5"):
        parse_config(tiny_config(tmp_path, attacks=[{"name": "aa", "lambda_e": [1.0, -0.5]}]))
    with pytest.raises(ConfigError, match="lambda_e sweep is empty"):
        parse_config(tiny_config(tmp_path, attacks=[{"name": "aa", "lambda_e": []}]))
    cfg = parse_config(tiny_config(tmp_path, attacks=[{"name": "aa", "lambda_e": [0.5, 2]}]))
    assert [a.params()["lambda_e"] for a in cfg.attacks] == [0.5, 2]


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adaptive")
    attack = {"eps": 48, "step_size": 16, "steps": 2, "optimizer": "pgd"}
    cfg = parse_config(
        tiny_config(
            tmp,
            shard_size=10,
            batch_size=5,
            dataset={"name": "mnist", "params": {"root": str(tmp / "mnist"), "split": "test"}, "limit": 10},
            attacks=[
                {"name": "pgd", **attack},
                {"name": "bpda", "eot": 2, **attack},
                {"name": "aa", "lambda_e": [0.0, 10.0], **attack},
            ],
            defenses=[{"name": "vanilla"}, {"name": "equivariance", "steps": 2, "views": ["hflip"]}],
            cluster={"in_process": True, "torch_threads": 1},
        )
    )
    from tests.pipeline_helpers import mnist_root

    mnist_root(tmp)
    summary = run(cfg)
    return cfg, summary


def test_pipeline_generates_defense_aware_attacks_per_defense(adaptive_run) -> None:
    cfg, summary = adaptive_run
    assert summary.ok
    rows = R.read_results_table(cfg.results_dir, summary.run_id).to_pylist()
    keys = {(r["attack"], r["defense"]): r["attack_key"] for r in rows if r["metric"] == "accuracy"}
    assert keys[("pgd", "vanilla")] == keys[("pgd", "equivariance")]  # one cache entry serves every defense
    assert keys[("bpda", "vanilla")] != keys[("bpda", "equivariance")]  # BPDA images depend on the defense
    # The worst case over the lambda_e sweep is the min of the two AA rows, per defense.
    for defense in ("vanilla", "equivariance"):
        aa = [r for r in rows if r["metric"] == "accuracy" and r["defense"] == defense and r["attack"] == "aa"]
        worst = [r for r in rows if r["metric"] == "accuracy" and r["defense"] == defense and r["attack"] == "aa:worst"]
        assert len(aa) == 2 and len(worst) == 1
        assert worst[0]["value"] == min(r["value"] for r in aa)
    # Both adaptive attacks (BPDA with EOT for this randomised defense, and AA) ran: no masking flag.
    assert all(r["masking_warning"] == "" for r in rows)
    assert {r["defense"]: r["defense_test_time"] for r in rows} == {"vanilla": False, "equivariance": True}
    text = report(cfg.results_dir, summary.run_id)
    assert "| aa:worst (lambda_e in {0, 10}) |" in text
    assert "worst-case lambda_e per defense: vanilla: " in text
    assert "gradient masking" not in text


def test_results_flag_a_test_time_defense_evaluated_without_adaptive_attacks(tmp_path) -> None:
    from tests.pipeline_helpers import mnist_root

    mnist_root(tmp_path)
    cfg = parse_config(
        tiny_config(
            tmp_path,
            shard_size=5,
            dataset={"name": "mnist", "params": {"root": str(tmp_path / "mnist"), "split": "test"}, "limit": 5},
            attacks=[{"name": "pgd", "eps": 48, "step_size": 16, "steps": 1}, {"name": "bpda", "steps": 1, "eot": 1}],
            defenses=[{"name": "vanilla"}, {"name": "equivariance", "steps": 1, "views": ["hflip"]}],
            cluster={"in_process": True, "torch_threads": 1},
        )
    )
    summary = run(cfg)
    rows = R.read_results_table(cfg.results_dir, summary.run_id).to_pylist()
    flags = {r["defense"]: r["masking_warning"] for r in rows}
    assert flags["vanilla"] == ""
    expected = "equivariance is a test-time defense not evaluated with BPDA with EOT or AA"
    assert flags["equivariance"].startswith(expected)
    assert "WARNING (gradient masking): equivariance is a test-time defense" in report(cfg.results_dir, summary.run_id)


@pytest.mark.parametrize("name", sorted(DEFENSES.names()))
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_declared_randomness_matches_behaviour(name: str, task: str, selfsup_heads) -> None:
    """AutoAttack-style check: the gradient-masking flags trust ``randomized``, so it must not lie. Two seeds give
    different purified images exactly when the defense declares itself randomised; one seed always repeats."""
    s = make_task(task)
    d = DEFENSES.build(name, **defense_params_for(name, task, selfsup_heads)).with_attack_eps(8.0)
    if d.optimizes_at_test_time:
        d = dataclasses.replace(d, steps=2)
    a = d.purify(s.adapter, s.x, SEEDS)
    assert torch.equal(a, d.purify(s.adapter, s.x, SEEDS))
    b = d.purify(s.adapter, s.x, [sd + 100 for sd in SEEDS])
    assert (not torch.equal(a, b)) == bool(d.randomized), f"{name}.randomized = {d.randomized}"


@pytest.mark.parametrize("name", ["rotation", "contrastive"])
def test_adaptive_attacks_use_the_self_supervised_objectives(name: str, selfsup_heads) -> None:
    s = make_task("classification")
    d = build_defense(name, steps=2, eps_v=8.0, **defense_params_for(name, "classification", selfsup_heads))
    task_loss = build_loss("ce", s.adapter, s.y)
    aa = grad_of(adaptive_loss(task_loss, d, s.adapter, 3.0), s.x)
    term = grad_of(lambda x: d.score(s.adapter, x, 0), s.x)
    torch.testing.assert_close(aa, grad_of(task_loss, s.x) + 3.0 * term, rtol=1e-4, atol=1e-6)
    x_adv = run_attack(build_attack("bpda", eps=8, steps=2, eot=2), s.adapter, s.x, s.y, SEEDS, defense=d).x_adv
    assert (x_adv - s.x).abs().max() <= 8 / 255 + 1e-6
