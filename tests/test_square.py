"""The Square attack: score-based (no gradient), inside the ball, per-sample streams, effective on a real model."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import equicore  # noqa: F401  (registrations)
from equicore.attacks.square import SquareResult, margin_loss, p_selection, square_attack
from equicore.errors import DatasetError, InvalidInputError
from equicore.models.common import WEIGHTS_DIR
from equicore.registry import DATASETS, MODELS
from tests.models_for_tests import NUM_CLASSES, TinyClassifier, random_images, seeded_model

EPS = {"linf": 8.0, "l2": 96.0}  # /255 units
NORMS = sorted(EPS)

# The shipped Fashion-MNIST CNN on its first 32 test images: norm -> (eps in /255 units, queries, least drop in
# accuracy). About 10 s (Linf) and 4 s (L2) on one core.
FASHION_N = 32
FASHION = {"linf": (8.0, 300, 0.2), "l2": (382.5, 100, 0.3)}


def tiny(dtype: torch.dtype = torch.float64) -> nn.Module:
    return seeded_model(TinyClassifier, 0, dtype)


def tiny_batch(n: int = 6, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    return random_images(n, 3, (16, 16), seed=7, dtype=dtype), torch.arange(n) % NUM_CLASSES


def in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> bool:
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(dim=1) if norm == "linf" else d.norm(dim=1)
    return bool((size <= eps / 255.0 + 1e-6).all())


# ------------------------------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def fashion() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    try:
        ds = DATASETS.build("fashion_mnist", split="test", limit=FASHION_N)
    except DatasetError as e:
        pytest.skip(f"Fashion-MNIST unavailable: {e}")
    net = MODELS.build("fashion_cnn", checkpoint=WEIGHTS_DIR / "fashion_cnn.pt").eval()
    x = torch.stack([ds[i].image for i in range(len(ds))])
    y = torch.tensor([int(ds[i].target) for i in range(len(ds))])
    return net, x, y


@pytest.fixture(scope="module")
def fashion_run(fashion) -> Callable[[str], SquareResult]:
    """One Square run per norm, shared by the tests below (computed on first use)."""
    net, x, y = fashion

    @functools.cache
    def run(norm: str) -> SquareResult:
        eps, n_queries, _ = FASHION[norm]
        return square_attack(margin_loss(net, y), x, eps=eps, n_queries=n_queries, norm=norm, seeds=range(len(x)))

    return run


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("norm", NORMS)
def test_square_fools_the_undefended_fashion_cnn(norm: str, fashion, fashion_run) -> None:
    """Measured (clean 28/32 = 87.5%): Linf 8/255, 300 queries: robust 17-19/32 over four seed sets (1000 queries
    on 64 images: 89% -> 30%); L2 1.5 (382.5/255), 100 queries: robust 11-12/32. The bounds leave 2-3 images of
    slack."""
    net, x, y = fashion
    eps, n_queries, least_drop = FASHION[norm]
    r = fashion_run(norm)
    clean, robust = accuracy(net, x, y), accuracy(net, r.x_adv, y)
    assert clean >= 0.8
    assert robust <= clean - least_drop, (clean, robust)
    with torch.no_grad():
        fooled = net(r.x_adv).argmax(1) != y
        already_wrong = net(x).argmax(1) != y
    assert torch.equal(r.success, fooled)  # success means margin < 0, i.e. the prediction moved off the label
    assert in_ball(r.x_adv, x, eps, norm) and 0 <= float(r.x_adv.min()) and float(r.x_adv.max()) <= 1
    assert int(r.queries.max()) <= n_queries
    assert (r.queries[already_wrong] == 1).all() and torch.equal(r.x_adv[already_wrong], x[already_wrong])


@pytest.mark.parametrize("norm", NORMS)
def test_agrees_with_torchattacks_square(norm: str, fashion, fashion_run) -> None:
    """Same model, images, eps and number of model evaluations (torchattacks' loop spends one on the clean
    prediction and one on its start before its ``n_queries`` iterations). Measured over two to four seed pairs:
    robust counts differ by at most 2 images (Linf) and 3 (L2, 200 queries)."""
    torchattacks = pytest.importorskip("torchattacks")
    net, x, y = fashion
    eps, n_queries, _ = FASHION[norm]
    ref = torchattacks.Square(net, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps / 255, n_queries=n_queries - 2)
    adv = ref(x, y)
    with torch.no_grad():
        ours = int((net(fashion_run(norm).x_adv).argmax(1) == y).sum())
        theirs = int((net(adv).argmax(1) == y).sum())
    assert abs(ours - theirs) <= 4, (ours, theirs)


# ----------------------------------------------------------------------------------------------- no gradients


class GradFree(nn.Module):
    """A classifier that fails if it is ever evaluated with autograd on or on an input that requires grad."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled(), "margin evaluated with autograd enabled"
        assert not x.requires_grad, "attack input requires grad"
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("norm", NORMS)
def test_never_takes_a_gradient(norm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a, **_k):
        raise AssertionError("the Square attack must not call autograd")

    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    model = GradFree(tiny(torch.float32))
    for p in model.parameters():
        p.requires_grad_(True)
    x, y = tiny_batch(4, torch.float32)
    x.requires_grad_(True)
    r = square_attack(margin_loss(model, y), x, eps=EPS[norm], n_queries=20, norm=norm)
    assert model.calls >= 2
    assert not r.x_adv.requires_grad and r.x_adv.grad_fn is None
    assert all(p.grad is None for p in model.parameters()) and x.grad is None


# ------------------------------------------------------------------------------------------ contract and budget


class Recorder:
    """A margin_fn that logs which images each query was about and checks every queried point."""

    def __init__(self, margin_fn, x: torch.Tensor, eps: float, norm: str) -> None:
        self.margin_fn, self.x, self.eps, self.norm = margin_fn, x, eps, norm
        self.counts = torch.zeros(x.shape[0], dtype=torch.int64)
        self.last_margin = torch.full((x.shape[0],), float("nan"), dtype=torch.float64)

    def __call__(self, xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        assert idx.dtype == torch.int64 and idx.ndim == 1 and xs.shape[0] == idx.numel() > 0
        assert torch.equal(idx, idx.unique())  # sorted, no repeats
        assert not torch.is_grad_enabled() and not xs.requires_grad
        assert 0 <= float(xs.min()) and float(xs.max()) <= 1 and in_ball(xs, self.x[idx], self.eps, self.norm)
        self.counts[idx] += 1
        m = self.margin_fn(xs, idx)
        # A query about an image already at margin < 0 would be wasted.
        assert not (self.last_margin[idx] < 0).any(), "queried an image that had already succeeded"
        self.last_margin[idx] = torch.minimum(self.last_margin[idx].nan_to_num(float("inf")), m.double())
        return m


@pytest.mark.parametrize("norm", NORMS)
def test_in_range_inside_ball_and_within_budget(norm: str) -> None:
    model = tiny()
    x, _ = tiny_batch(8)
    with torch.no_grad():
        logits = model(x)
    # Images 0-3 labelled with their predicted class (to attack), 4-7 with their least likely one (already wrong).
    y = torch.cat([logits[:4].argmax(1), logits[4:].argmin(1)])
    n_queries = 40
    rec = Recorder(margin_loss(model, y), x, EPS[norm], norm)
    r = square_attack(rec, x, eps=EPS[norm], n_queries=n_queries, norm=norm, seeds=[3, 1, 4, 1, 5, 9, 2, 6])

    assert r.x_adv.shape == x.shape and r.x_adv.dtype == x.dtype and not r.x_adv.requires_grad
    assert 0 <= float(r.x_adv.min()) and float(r.x_adv.max()) <= 1 and in_ball(r.x_adv, x, EPS[norm], norm)
    assert r.queries.dtype == torch.int64 and r.success.dtype == torch.bool
    assert torch.equal(r.queries, rec.counts) and int(r.queries.max()) <= n_queries
    assert (r.queries[4:] == 1).all() and r.success[4:].all() and torch.equal(r.x_adv[4:], x[4:])
    # An image stops only on success or when its budget is spent.
    assert ((r.queries == n_queries) | r.success).all()
    # success and x_adv agree with a fresh evaluation.
    assert torch.equal(r.success, margin_loss(model, y)(r.x_adv, torch.arange(8)) < 0)
    assert torch.equal(r.success, rec.last_margin < 0)


def test_one_query_budget_and_zero_eps_only_look() -> None:
    model = tiny()
    x, y = tiny_batch(3)
    for kw in ({"n_queries": 1, "eps": 8.0}, {"n_queries": 50, "eps": 0.0}):
        r = square_attack(margin_loss(model, y), x, **kw)
        assert (r.queries == 1).all() and torch.equal(r.x_adv, x)


def test_untargeted_and_targeted_margins() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    idx = torch.tensor([0, 1])
    untargeted = margin_loss(lambda _x: logits, torch.tensor([0, 2]))
    assert torch.equal(untargeted(torch.zeros(2, 1, 1, 1), idx), torch.tensor([1.0, -4.0]))
    targeted = margin_loss(lambda _x: logits, torch.tensor([0, 2]), targeted=True)
    assert torch.equal(targeted(torch.zeros(2, 1, 1, 1), idx), torch.tensor([-1.0, 4.0]))
    # The labels are picked by idx, the subset's positions in the attacked batch.
    picked = margin_loss(lambda _x: logits[1:], torch.tensor([0, 2]))(torch.zeros(1, 1, 1, 1), torch.tensor([1]))
    assert torch.equal(picked, torch.tensor([-4.0]))


def test_targeted_square_reaches_the_target() -> None:
    model = tiny()
    x, _ = tiny_batch(4)
    with torch.no_grad():
        target = model(x).argsort(1)[:, -2]  # the runner-up class
    r = square_attack(margin_loss(model, target, targeted=True), x, eps=32.0, n_queries=100, seeds=[1, 2, 3, 4])
    with torch.no_grad():
        assert torch.equal(model(r.x_adv).argmax(1) == target, r.success)
    assert r.success.any()


def test_schedule() -> None:
    # The reference's halving points of a 10000-query run, rescaled to the budget.
    assert [p_selection(it, 10000, 0.8) for it in (0, 10, 11, 50, 51, 9000)] == [0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 512]
    assert p_selection(30, 100, 0.8) == 0.8 / 64  # 30/100 of the run: 3000 of 10000


@pytest.mark.parametrize("s", [3, 5, 8, 25])
def test_l2_start_is_the_reference_window_profile_on_every_window(s: int) -> None:
    """Query 2 (the L2 initial perturbation) of a grey 5s x 5s image: the reference's 5 x 5 grid of s x s windows,
    each holding the same L2 mass, all of one sign on one half and of the other sign on the other half (split by
    rows, or by columns where the window is transposed)."""
    x = torch.full((3, 1, 5 * s, 5 * s), 0.5, dtype=torch.float64)
    queried: list[torch.Tensor] = []

    def never_fooled(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        queried.append(xs.clone())
        return torch.ones(len(idx), dtype=torch.float64)

    eps = 32.0  # /255: spread over 25 windows, so no pixel reaches the [0, 1] clamp
    square_attack(never_fooled, x, eps=eps, n_queries=2, norm="l2", seeds=[1, 2, 3])
    assert len(queried) == 2 and torch.equal(queried[0], x)
    half = s // 2

    def split(w: torch.Tensor) -> bool:
        top, bottom = w[:half], w[half:]
        return bool(((top > 0).all() and (bottom < 0).all()) or ((top < 0).all() and (bottom > 0).all()))

    for delta in (queried[1] - x)[:, 0]:
        windows = delta.unfold(0, s, s).unfold(1, s, s).reshape(25, s, s)
        for w in windows:
            assert abs(float(w.norm()) - eps / 255 / 5) < 1e-12
            assert split(w) or split(w.T)


# ------------------------------------------------------------------------------- determinism and independence


@pytest.mark.parametrize("norm", NORMS)
def test_an_image_gets_the_same_result_whatever_its_batch_mates(norm: str) -> None:
    """float64, so the model's own batch-size dependence cannot flip an accept/reject decision."""
    model = tiny()
    x, y = tiny_batch(6)
    seeds = [11 * i + 3 for i in range(6)]
    kw = {"eps": EPS[norm], "n_queries": 30, "norm": norm}
    full = square_attack(margin_loss(model, y), x, seeds=seeds, **kw)
    for i in (0, 4):
        alone = square_attack(margin_loss(model, y[i : i + 1]), x[i : i + 1], seeds=seeds[i : i + 1], **kw)
        assert torch.equal(alone.x_adv, full.x_adv[i : i + 1]) and torch.equal(alone.queries, full.queries[i : i + 1])
    order = [5, 2, 0, 3]
    mixed = square_attack(margin_loss(model, y[order]), x[order], seeds=[seeds[j] for j in order], **kw)
    for k, j in enumerate(order):
        assert torch.equal(mixed.x_adv[k], full.x_adv[j]) and mixed.queries[k] == full.queries[j]
        assert mixed.success[k] == full.success[j]


@pytest.mark.parametrize("norm", NORMS)
def test_same_seeds_same_output_other_seeds_differ(norm: str) -> None:
    model = tiny()
    x, y = tiny_batch(4)
    kw = {"eps": EPS[norm], "n_queries": 15, "norm": norm}
    a = square_attack(margin_loss(model, y), x, seeds=[1, 2, 3, 4], **kw)
    torch.manual_seed(123)  # the global RNG plays no part
    b = square_attack(margin_loss(model, y), x, seeds=[1, 2, 3, 4], **kw)
    c = square_attack(margin_loss(model, y), x, seeds=[5, 6, 7, 8], **kw)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
    attacked = a.queries > 1
    assert attacked.any()
    for i in attacked.nonzero().flatten().tolist():
        assert not torch.equal(a.x_adv[i], c.x_adv[i])


# ------------------------------------------------------------------------------------------------- bad input


def _margin(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.ones(xs.shape[0])


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"n_queries": 0}, "n_queries"),
        ({"n_queries": 2.5}, "n_queries"),
        ({"n_queries": True}, "n_queries"),
        ({"p_init": 0.0}, "p_init"),
        ({"p_init": 1.5}, "p_init"),
        ({"p_init": "0.5"}, "p_init"),
        ({"norm": "l1"}, "norm"),
        ({"norm": "Linf"}, "norm"),
        ({"seeds": [1, 2]}, "seeds"),
        ({"eps": -1.0}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"eps": 300.0}, "eps"),
        ({"margin_fn": "margin"}, "margin_fn"),
        ({"margin_fn": lambda xs, idx: torch.ones(xs.shape[0], 2)}, "margin_fn"),
        ({"margin_fn": lambda xs, idx: torch.ones(xs.shape[0], dtype=torch.long)}, "margin_fn"),
        ({"margin_fn": lambda xs, idx: torch.full((xs.shape[0],), float("nan"))}, "margin_fn"),
        ({"x": torch.rand(3, 16, 16)}, "attack input"),
        ({"x": torch.full((3, 3, 16, 16), 1.5)}, "attack input"),
    ],
)
def test_bad_input_names_the_parameter(kw: dict, name: str) -> None:
    args = {"margin_fn": _margin, "x": torch.rand(3, 3, 16, 16), "eps": 8.0, "n_queries": 5, "seeds": [1, 2, 3]}
    args.update(kw)
    margin_fn, x = args.pop("margin_fn"), args.pop("x")
    with pytest.raises(InvalidInputError, match=name):
        square_attack(margin_fn, x, **args)


def test_margin_loss_bad_input() -> None:
    model = tiny(torch.float32)
    with pytest.raises(InvalidInputError, match="labels"):
        margin_loss(model, torch.zeros(3))
    with pytest.raises(InvalidInputError, match="labels"):
        margin_loss(model, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="logits_fn"):
        margin_loss("model", torch.zeros(3, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="labels"):
        square_attack(margin_loss(model, torch.full((2,), 7)), torch.rand(2, 3, 16, 16), eps=8.0, n_queries=3)
