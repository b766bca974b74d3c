"""APGD: the reference's algorithm (checked against torchattacks from the same start), its cascade over restarts
and target classes, and its losses."""

from __future__ import annotations

import pytest
import torch

import equicore  # noqa: F401  (registrations)
from equicore.adapters import build_adapter
from equicore.attacks import apgd, build_attack, build_loss, run_attack
from equicore.errors import InvalidInputError
from equicore.models.common import WEIGHTS_DIR
from equicore.registry import DATASETS, MODELS
from equicore.seeding import per_sample_draw
from tests.models_for_tests import make_task

N_FASHION = 128


@pytest.fixture(scope="module")
def fashion():
    ds = DATASETS.build("fashion_mnist", split="test", limit=N_FASHION)
    net = MODELS.build("fashion_cnn", checkpoint=WEIGHTS_DIR / "fashion_cnn.pt").eval()
    x = torch.stack([ds[i].image for i in range(len(ds))])
    y = torch.tensor([int(ds[i].target) for i in range(len(ds))])
    return net, build_adapter("classification", net), x, y


def robust(adapter, x_adv: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((adapter.predict(x_adv) == y).sum())


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_matches_torchattacks_from_the_same_start(loss: str, fashion, monkeypatch) -> None:
    """Same model, images, budget and starting point: torchattacks' APGD (a port of AutoAttack's) and ours must leave
    the same images robust, within 2 of 128 (float rounding can flip a borderline image)."""
    torchattacks = pytest.importorskip("torchattacks")
    net, adapter, x, y = fashion
    seeds = list(range(N_FASHION))
    ours = run_attack(build_attack("apgd", eps=8, loss=loss), adapter, x, y, seeds).x_adv
    # Our start is x + eps * u' / max|u'| with u' = 2u - 1 and u drawn per image; torchattacks draws u with
    # torch.rand over the batch of images it attacks (those classified correctly). Hand it our draws.
    with torch.no_grad():
        correct = (adapter.predict(x) == y).nonzero().flatten().tolist()
    u = per_sample_draw("uniform", x.shape[1:], [seeds[i] for i in correct], ("apgd-start", 0))
    real_rand = torch.rand

    def our_uniforms(*shape, **kwargs):
        size = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else tuple(shape)
        return u.clone() if size == tuple(u.shape) else real_rand(*shape, **kwargs)

    monkeypatch.setattr(torch, "rand", our_uniforms)
    theirs = torchattacks.APGD(net, norm="Linf", eps=8 / 255, steps=100, n_restarts=1, loss=loss, seed=0)(x, y)
    monkeypatch.setattr(torch, "rand", real_rand)
    r_ours, r_theirs = robust(adapter, ours, y), robust(adapter, theirs, y)
    assert abs(r_ours - r_theirs) <= 2, (r_ours, r_theirs)
    assert r_ours < robust(adapter, x, y) // 2  # and the attack is real: most correct images are broken


def test_restarts_run_only_on_samples_not_yet_fooled() -> None:
    s = make_task("classification", n=6)
    calls: list[int] = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, x):
            calls.append(x.shape[0])
            return self.inner(x)

        @property
        def fooled(self):
            return self.inner.fooled

        def select(self, idx):
            return Recording(self.inner.select(idx))

    loss = Recording(build_loss("ce", s.adapter, s.y))
    res = apgd(loss, s.x, eps=32 / 255, steps=5, n_restarts=3, seeds=list(range(6)))
    assert res.fooled is not None
    first, later = calls[:6], calls[6:]
    assert first == [6] * 6  # the first run: every sample, initial point + 5 steps
    # Later runs see only the samples the earlier runs did not fool.
    assert all(n <= 6 - int(res.fooled.sum()) or n < 6 for n in later)
    with torch.no_grad():
        assert bool((s.adapter.predict(res.x_adv)[res.fooled] != s.y[res.fooled]).all())


def test_top_k_targets_cascade_and_break_images() -> None:
    s = make_task("classification", n=6)
    attack = build_attack("apgd_t", eps=32, steps=5, n_target_classes=3)
    x_adv = run_attack(attack, s.adapter, s.x, s.y, list(range(6))).x_adv
    assert float((x_adv - s.x).abs().max()) <= 32 / 255 + 1e-6
    with torch.no_grad():
        assert int((s.adapter.predict(x_adv) != s.y).sum()) > int((s.adapter.predict(s.x) != s.y).sum())


def test_dlr_is_scale_and_shift_invariant() -> None:
    s = make_task("classification", n=4)
    loss = build_loss("dlr", s.adapter, s.y)
    base = loss(s.x)
    orig_logits = s.adapter.logits
    try:
        s.adapter.logits = lambda x: 7.0 * orig_logits(x) + 3.0  # type: ignore[method-assign]
        torch.testing.assert_close(loss(s.x), base, rtol=1e-4, atol=1e-5)
    finally:
        s.adapter.logits = orig_logits  # type: ignore[method-assign]


def test_dlr_matches_the_formula() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.5, -1.0], [0.0, 2.0, 1.0, -1.0]])
    y = torch.tensor([0, 0])
    adapter = type("A", (), {"task": "classification", "logits": staticmethod(lambda x: logits)})()
    value = build_loss("dlr", adapter, y)(torch.zeros(2, 1, 1, 1))
    # Sample 0 is correct: -(3 - 1) / (3 - 0.5); sample 1 is wrong: -(0 - 2) / (2 - 0).
    torch.testing.assert_close(value, torch.tensor([-2 / 2.5, 1.0]))
    targeted = build_loss("dlr", adapter, torch.tensor([2, 3]), targeted=True, true_labels=y)(torch.zeros(2, 1, 1, 1))
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    torch.testing.assert_close(
        targeted, torch.tensor([-(3 - 0.5) / (3 - (0.5 - 1) / 2), -(0 - -1) / (2 - (0 - 1) / 2)])
    )


def test_bad_apgd_input_is_one_clear_error() -> None:
    with pytest.raises(InvalidInputError, match="apgd.step_size: the apgd optimizer sets its own step size"):
        build_attack("apgd", step_size=2)
    with pytest.raises(InvalidInputError, match="apgd.momentum: only the pgd optimizer reads it"):
        build_attack("apgd", momentum=0.9)
    with pytest.raises(InvalidInputError, match="pgd.n_restarts: only the apgd optimizer reads it"):
        build_attack("pgd", n_restarts=3)
    with pytest.raises(InvalidInputError, match="apgd.rho: expected a number in"):
        build_attack("apgd", rho=1.5)
    with pytest.raises(InvalidInputError, match="apgd.optimizer: expected one of"):
        build_attack("apgd", optimizer="adam")
    with pytest.raises(InvalidInputError, match="target: 'top'"):
        build_attack("pgd", targeted=True, target="top")
    with pytest.raises(InvalidInputError, match="the targeted DLR loss needs true_labels"):
        s = make_task("classification", n=2)
        build_loss("dlr", s.adapter, s.y, targeted=True)
    with pytest.raises(InvalidInputError, match="square.norm"):
        build_attack("square", norm="l1")
    with pytest.raises(InvalidInputError, match="Square attack here is untargeted"):
        build_attack("square", targeted=True)
    s = make_task("segmentation", n=2)
    with pytest.raises(InvalidInputError, match="Square attack is defined for classification"):
        run_attack(build_attack("square", n_queries=2), s.adapter, s.x, s.y, [0, 1])
