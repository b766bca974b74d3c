"""SEA's per-pixel segmentation losses (equicore/attacks/dense_losses.py): hand-computed values, masking, ignored
pixels, per-image values and gradients, and a measured effect under the project's PGD loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import equicore.attacks.dense_losses  # noqa: F401  (registers the losses)
from equicore.adapters import SegmentationAdapter
from equicore.attacks.loop import projected_gradient
from equicore.errors import InvalidInputError
from equicore.registry import LOSSES
from tests.models_for_tests import IGNORE_INDEX, make_task

NAMES = ("masked_ce", "masked_ce_balanced", "js", "masked_spherical")
MASKED = ("masked_ce", "masked_ce_balanced", "masked_spherical")


class LogitsAreTheImage(nn.Module):
    """A 1x1 convolution with identity weights: the segmentation logits at each pixel are the pixel's values, so a
    test writes the logits it wants directly as the image."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(classes, classes, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(classes).view(classes, classes, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def identity_adapter() -> SegmentationAdapter:
    model = LogitsAreTheImage().double().requires_grad_(False)
    return SegmentationAdapter(model, num_classes=3, ignore_index=IGNORE_INDEX)


# One 2x2 image, 3 classes: pixel -> (logits, label). (0, 0) and (1, 0) are classified correctly, (0, 1) is not
# (argmax 1, label 2), (1, 1) is ignored. Three labelled pixels.
PIXELS = {
    (0, 0): ([0.9, 0.2, 0.1], 0),
    (0, 1): ([0.1, 0.8, 0.3], 2),
    (1, 0): ([0.2, 0.3, 0.7], 2),
    (1, 1): ([0.5, 0.4, 0.6], IGNORE_INDEX),
}
N_LABELLED = 3


def fixed_case(pixels: dict = PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    y = torch.zeros(1, 2, 2, dtype=torch.long)
    for (i, j), (logits, label) in pixels.items():
        x[0, :, i, j] = torch.tensor(logits, dtype=torch.float64)
        y[0, i, j] = label
    return x, y


def loss_value(name: str, x: torch.Tensor, y: torch.Tensor, targeted: bool = False, **params) -> torch.Tensor:
    fn = LOSSES.build(name, adapter=identity_adapter(), labels=y, targeted=targeted, **params)
    return fn(x)


# --- hand computations, one pixel at a time with plain torch ops -------------------------------------------------


def softmax(u: list[float]) -> torch.Tensor:
    e = torch.tensor(u, dtype=torch.float64).exp()
    return e / e.sum()


def hand_total(per_pixel, pixels: dict = PIXELS) -> float:
    """Sum of ``per_pixel(logits, label)`` over labelled pixels, divided by the number of labelled pixels."""
    labelled = [(u, c) for u, c in pixels.values() if c != IGNORE_INDEX]
    return sum(per_pixel(u, c) for u, c in labelled) / len(labelled)


def correct(u: list[float], c: int) -> bool:
    return max(range(len(u)), key=lambda k: u[k]) == c


def ce(u: list[float], c: int) -> float:
    return -math.log(float(softmax(u)[c]))


def js(u: list[float], c: int) -> float:
    p = softmax(u)
    q = torch.zeros(3, dtype=torch.float64)
    q[c] = 1.0
    m = (p + q) / 2
    kl_pm = float((p * (p / m).log()).sum())
    kl_qm = float(math.log(1.0 / float(m[c])))  # q is one-hot: only its label term survives
    return 0.5 * kl_pm + 0.5 * kl_qm


def sph(s: torch.Tensor, c: int) -> float:
    return float(s[c] / s.pow(2).sum().sqrt())


def test_masked_ce_by_hand() -> None:
    x, y = fixed_case()
    expected = hand_total(lambda u, c: ce(u, c) if correct(u, c) else 0.0)
    torch.testing.assert_close(loss_value("masked_ce", x, y), torch.tensor([expected], dtype=torch.float64))
    # Normalised by all labelled pixels (3), not by the still-correct ones (2).
    by_correct = (ce(*PIXELS[(0, 0)]) + ce(*PIXELS[(1, 0)])) / 2
    assert not math.isclose(float(loss_value("masked_ce", x, y)), by_correct)
    targets = torch.tensor([[[1, 2], [2, IGNORE_INDEX]]])
    # Targeted: -CE to the target on pixels not predicting it yet. Predictions are [[0, 1], [2, .]]: (0, 0) and
    # (0, 1) are not at their targets 1 and 2; (1, 0) already is.
    tgt_pixels = {k: (u, int(targets[0, k[0], k[1]])) for k, (u, _) in PIXELS.items()}
    expected_t = hand_total(lambda u, c: 0.0 if correct(u, c) else -ce(u, c), tgt_pixels)
    torch.testing.assert_close(
        loss_value("masked_ce", x, targets, targeted=True), torch.tensor([expected_t], dtype=torch.float64)
    )


def test_masked_ce_balanced_by_hand() -> None:
    x, y = fixed_case()
    w = [0.2, 0.5, 0.3]
    expected = hand_total(lambda u, c: w[c] * ce(u, c) if correct(u, c) else 0.0)
    torch.testing.assert_close(
        loss_value("masked_ce_balanced", x, y, class_weights=w), torch.tensor([expected], dtype=torch.float64)
    )
    # Default: per-image inverse label frequency, normalised to sum to 1 over the present classes. Labelled pixels:
    # class 0 once, class 2 twice -> w_0 = (1/1) / (1/1 + 1/2) = 2/3, w_2 = (1/2) / (3/2) = 1/3.
    w_default = {0: 2 / 3, 2: 1 / 3}
    expected_default = hand_total(lambda u, c: w_default[c] * ce(u, c) if correct(u, c) else 0.0)
    torch.testing.assert_close(
        loss_value("masked_ce_balanced", x, y), torch.tensor([expected_default], dtype=torch.float64)
    )
    # Uniform weights of 1 are masked_ce.
    torch.testing.assert_close(
        loss_value("masked_ce_balanced", x, y, class_weights=[1.0, 1.0, 1.0]), loss_value("masked_ce", x, y)
    )


def test_js_by_hand() -> None:
    x, y = fixed_case()
    expected = hand_total(js)
    torch.testing.assert_close(loss_value("js", x, y), torch.tensor([expected], dtype=torch.float64))
    torch.testing.assert_close(loss_value("js", x, y, targeted=True), torch.tensor([-expected], dtype=torch.float64))
    # Its range, finite at the ends: 0 for a confident correct pixel, log 2 for a confident wrong one (logits far
    # apart: a numerically one-hot softmax, whose other probabilities underflow to 0).
    sure = torch.tensor([800.0, 0.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    for label, bound in ((0, 0.0), (1, math.log(2.0))):
        xg = sure.clone().requires_grad_(True)
        value = loss_value("js", xg, torch.full((1, 1, 1), label))
        (grad,) = torch.autograd.grad(value.sum(), xg)
        assert math.isclose(float(value.detach()), bound, abs_tol=1e-12) and torch.isfinite(grad).all()


def test_masked_spherical_by_hand() -> None:
    x, y = fixed_case()
    t = torch.tensor
    expected = hand_total(lambda u, c: -sph(t(u, dtype=torch.float64), c) if correct(u, c) else 0.0)
    torch.testing.assert_close(loss_value("masked_spherical", x, y), t([expected], dtype=torch.float64))
    expected_p = hand_total(lambda u, c: -sph(softmax(u), c) if correct(u, c) else 0.0)
    torch.testing.assert_close(
        loss_value("masked_spherical", x, y, scores="probs"), t([expected_p], dtype=torch.float64)
    )
    # Targeted: +normalised target score on pixels not yet predicting the target.
    targets = t([[[1, 2], [2, IGNORE_INDEX]]])
    tgt_pixels = {k: (u, int(targets[0, k[0], k[1]])) for k, (u, _) in PIXELS.items()}
    expected_t = hand_total(lambda u, c: 0.0 if correct(u, c) else sph(t(u, dtype=torch.float64), c), tgt_pixels)
    torch.testing.assert_close(
        loss_value("masked_spherical", x, targets, targeted=True), t([expected_t], dtype=torch.float64)
    )


# --- masks and ignored pixels ---------------------------------------------------------------------------------


def with_pixel(pixel: tuple[int, int], logits: list[float]) -> torch.Tensor:
    x, _ = fixed_case({**PIXELS, pixel: (logits, PIXELS[pixel][1])})
    return x


@pytest.mark.parametrize("name", MASKED)
def test_masked_losses_skip_misclassified_pixels(name: str) -> None:
    x, y = fixed_case()
    # (0, 1) stays misclassified (argmax 1, label 2) with very different logits: the loss does not move.
    moved = with_pixel((0, 1), [0.0, 1.0, 0.6])
    torch.testing.assert_close(loss_value(name, moved, y), loss_value(name, x, y))
    # Once it is classified correctly it counts.
    fixed = with_pixel((0, 1), [0.1, 0.3, 0.8])
    assert not torch.allclose(loss_value(name, fixed, y), loss_value(name, x, y))
    # And the mask is not differentiated: no gradient reaches a misclassified pixel.
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_value(name, xg, y).sum(), xg)
    assert grad[0, :, 0, 1].abs().sum() == 0 and grad[0, :, 0, 0].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_ignored_pixels_do_not_count(name: str) -> None:
    x, y = fixed_case()
    for logits in ([0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.3, 0.3, 0.3]):
        moved = with_pixel((1, 1), logits)
        torch.testing.assert_close(loss_value(name, moved, y), loss_value(name, x, y))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_value(name, xg, y).sum(), xg)
    assert grad[0, :, 1, 1].abs().sum() == 0


def test_js_counts_misclassified_pixels() -> None:
    """JS has no mask: a misclassified pixel's logits do move it."""
    x, y = fixed_case()
    assert not torch.allclose(loss_value("js", with_pixel((0, 1), [0.0, 1.0, 0.6]), y), loss_value("js", x, y))


# --- per image, gradients, empty images -----------------------------------------------------------------------


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize("name", NAMES)
def test_one_value_per_image_with_gradients(name: str, targeted: bool) -> None:
    s = make_task("segmentation", n=3)
    y = s.y.clone()
    y[2] = IGNORE_INDEX  # an image with no labelled pixel
    fn = LOSSES.build(name, adapter=s.adapter, labels=y, targeted=targeted)
    x = s.x.clone().requires_grad_(True)
    value = fn(x)
    assert value.shape == (3,) and value.dtype == x.dtype and torch.isfinite(value).all()
    assert value[2] == 0
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.isfinite(grad).all()
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0 and grad[2].abs().sum() == 0
    # Image 0's value does not depend on image 1.
    x2 = s.x.clone()
    x2[1] = 1 - x2[1]
    assert torch.equal(fn(x2)[0].detach(), value[0].detach())


# --- a measured effect under the project's PGD ----------------------------------------------------------------


def pixel_accuracy(adapter: SegmentationAdapter, x: torch.Tensor, labels: torch.Tensor) -> float:
    valid = labels != IGNORE_INDEX
    return float((adapter.predict(x) == labels)[valid].float().mean())


ATTACK_CASES = [pytest.param(n, {}, id=n) for n in NAMES] + [
    pytest.param("masked_spherical", {"scores": "probs"}, id="masked_spherical-probs")
]


@pytest.mark.parametrize("name,params", ATTACK_CASES)
def test_pgd_with_each_loss_lowers_pixel_accuracy(name: str, params: dict) -> None:
    s = make_task("segmentation", n=4)
    # Labels: the model's own clean predictions (100% clean accuracy), with the task's ignored pixels kept.
    y = torch.where(s.y == IGNORE_INDEX, s.y, s.adapter.predict(s.x))
    seeds = [11, 12, 13, 14]
    untargeted = LOSSES.build(name, adapter=s.adapter, labels=y, **params)
    x_adv = projected_gradient(untargeted, s.x, eps=8, step_size=2, steps=10, seeds=seeds)
    assert pixel_accuracy(s.adapter, s.x, y) == 1.0
    assert pixel_accuracy(s.adapter, x_adv, y) < 0.75  # measured: 0.36-0.55 across these cases
    # Targeted towards each pixel's runner-up class: the share of pixels predicting their target rises from 0.
    with torch.no_grad():
        runner_up = s.adapter.logits(s.x).topk(2, dim=1).indices[:, 1]
    targets = torch.where(y == IGNORE_INDEX, y, runner_up)
    towards = LOSSES.build(name, adapter=s.adapter, labels=targets, targeted=True, **params)
    x_tgt = projected_gradient(towards, s.x, eps=8, step_size=2, steps=10, seeds=seeds)
    assert pixel_accuracy(s.adapter, s.x, targets) == 0.0
    assert pixel_accuracy(s.adapter, x_tgt, targets) > 0.2  # measured: 0.29-0.59


# --- registration and bad input -------------------------------------------------------------------------------


def test_registered_for_segmentation_only() -> None:
    for name in NAMES:
        assert name in LOSSES and LOSSES.meta(name)["tasks"] == ("segmentation",)
    c = make_task("classification", n=2)
    with pytest.raises(InvalidInputError, match="'masked_ce' is defined for segmentation"):
        LOSSES.build("masked_ce", adapter=c.adapter, labels=c.y)


def test_bad_parameters_and_labels() -> None:
    x, y = fixed_case()
    with pytest.raises(InvalidInputError, match=r"masked_spherical.scores: expected one of"):
        loss_value("masked_spherical", x, y, scores="softmax")
    with pytest.raises(InvalidInputError, match=r"class_weights: got 2 weights for 3 classes"):
        loss_value("masked_ce_balanced", x, y, class_weights=[1.0, 1.0])
    with pytest.raises(InvalidInputError, match=r"class_weights: expected finite weights >= 0"):
        loss_value("masked_ce_balanced", x, y, class_weights=[1.0, -1.0, 1.0])
    bad = y.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(InvalidInputError, match=r"js: labels: values must be class indices in \[0, 3\)"):
        loss_value("js", x, bad)
    with pytest.raises(InvalidInputError, match=r"masked_ce: labels: expected shape \(1, 2, 2\)"):
        loss_value("masked_ce", x, y[:, :1])
