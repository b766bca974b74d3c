"""The Square attack (Andriushchenko et al., ECCV 2020): a score-based random search that never takes a gradient.

Follows the reference implementation (fra31/auto-attack ``autoattack/square.py``): the Linf version starts from
vertical stripes of +-eps and proposes squares of +-2eps (clipped back to the ball); the L2 version starts from a
grid of centred "meta pseudo-gaussian" windows and proposes moving perturbation mass between two windows. A
proposal replaces the current best point when it lowers the sample's margin. The square size follows the
reference's ``p_selection`` schedule (rescaled to the query budget) and depends only on the iteration index.

Differences from the reference, all deliberate:

- every random draw for one image comes from that image's own generator (project rule: an image's result does not
  depend on its batch mates), where the reference shares one position and one sign per step across the batch;
- the clean image is the first query, and it counts: an image already on the wrong side (margin < 0) spends
  exactly one query and is returned unchanged (the reference filters such images outside its budget);
- success is margin < 0 strictly (the reference stops at margin <= 0: a tie is not a misclassification here).

:func:`defended_square` runs a registered Square attack on the scores of a defended model (``run_attack`` calls it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from equicore.errors import InvalidInputError
from equicore.seeding import as_seed_list, derive_seed, generator
from equicore.validation import check_eps, check_images, check_positive_int

if TYPE_CHECKING:
    from equicore.adapters import TaskAdapter
    from equicore.attacks.attack import Attack
    from equicore.defenses.base import Defense

# (x_subset, idx) -> one margin per row of x_subset; idx holds the rows' positions in the attacked batch.
MarginFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NORMS = ("linf", "l2")


@dataclass
class SquareResult:
    x_adv: torch.Tensor  # [B,C,H,W] detached, in [0,1], within eps of x (Linf or L2)
    queries: torch.Tensor  # [B] int64: margin evaluations spent on each sample (including the initial one)
    success: torch.Tensor  # [B] bool: margin < 0 reached


def margin_loss(
    logits_fn: Callable[..., torch.Tensor], labels: torch.Tensor, targeted: bool = False, with_indices: bool = False
) -> MarginFn:
    """A two-argument margin for :func:`square_attack` from a classifier's logits.

    Untargeted (``labels`` = true classes): ``z_y - max_{j!=y} z_j``. Targeted (``labels`` = targets):
    ``max_{j!=t} z_j - z_t``. Negative means the attacker has won. ``with_indices``: ``logits_fn(x, idx)`` also
    gets the images' positions in the batch (e.g. to seed a randomised defense per image).
    """
    if not callable(logits_fn):
        raise InvalidInputError(f"logits_fn: expected a callable x -> logits [B, K], got {type(logits_fn).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point() or labels.is_complex():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InvalidInputError(f"labels: expected a 1-D integer tensor of class indices, got {shape}")
    labels = labels.detach().long()

    def margin(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = logits_fn(x, idx) if with_indices else logits_fn(x)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0] or logits.shape[1] < 2:
            raise InvalidInputError(f"logits_fn: expected logits [{x.shape[0]}, K>=2], got {tuple(logits.shape)}")
        y = labels[idx.to(labels.device)].to(logits.device)
        if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
            raise InvalidInputError(f"labels: class indices must lie in [0, {logits.shape[1] - 1}]")
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        z_other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        return z_other - z_y if targeted else z_y - z_other

    return margin


def p_selection(it: int, n_queries: int, p_init: float) -> float:
    """The reference's schedule for the fraction of pixels a square covers, halved at fixed points of a
    10000-query run (rescaled to ``n_queries``)."""
    it = int(it / n_queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128)):
        if it <= bound:
            return p_init / div
    return p_init / (256 if it <= 8000 else 512)


@functools.lru_cache(maxsize=64)
def _eta_rectangle(rows: int, cols: int) -> torch.Tensor:
    """Nested centred rectangles, ring k weighted 1/(k+1)^2 (accumulated), unit L2 norm: a peaked, roughly
    gaussian profile that is cheap to build."""
    out = torch.zeros(rows, cols, dtype=torch.float64)
    r0, c0 = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        out[max(r0 - k, 0) : min(r0 + k + 1, rows), max(c0 - k, 0) : min(c0 + k + 1, cols)] += 1.0 / (k + 1) ** 2
    return out / out.norm()


@functools.lru_cache(maxsize=64)
def _eta(s: int) -> torch.Tensor:
    """The reference's ``eta``: a positive bump on the top half and a negative one on the bottom half of an
    s x s window, unit L2 norm (before the random transpose, which the caller draws)."""
    out = torch.zeros(s, s, dtype=torch.float64)
    if s // 2:  # s = 1 (tiny images) has only the negative half
        out[: s // 2] = _eta_rectangle(s // 2, s)
    out[s // 2 :] = -_eta_rectangle(s - s // 2, s)
    return out / out.norm()


def _l2_normalize(t: torch.Tensor) -> torch.Tensor:
    return t / (t.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)


def _l2_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def _signs(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u < 0.5, -1.0, 1.0)


def _positions(u: torch.Tensor, span: int) -> torch.Tensor:
    """Top-left offsets in ``[0, span)`` (``0`` when ``span`` is 0), as the reference's ``random_int(0, span)``:
    the last offset ``span`` is never drawn there either."""
    return (u * span).long()


def _window_mask(top: torch.Tensor, left: torch.Tensor, s: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """``[n,1,h,w]`` masks, 1 on each sample's own s x s window."""
    rows = torch.arange(h, device=like.device)
    cols = torch.arange(w, device=like.device)
    mh = (rows >= top[:, None]) & (rows < top[:, None] + s)
    mw = (cols >= left[:, None]) & (cols < left[:, None] + s)
    return (mh[:, None, :, None] & mw[:, None, None, :]).to(like.dtype)


def _draw(gens: Sequence[torch.Generator], idx: torch.Tensor, k: int, device: torch.device) -> torch.Tensor:
    """``[n, k]`` uniforms, row j from the generator of sample ``idx[j]`` (CPU streams: same draws on any device)."""
    u = torch.stack([torch.rand(k, generator=gens[i], dtype=torch.float64) for i in idx.tolist()])
    return u.to(device)


def _query(margin_fn: MarginFn, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        m = margin_fn(x, idx)
    if not isinstance(m, torch.Tensor) or m.ndim != 1 or m.shape[0] != x.shape[0] or not m.is_floating_point():
        got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise InvalidInputError(f"margin_fn: expected one float margin per image [{x.shape[0]}], got {got}")
    if not torch.isfinite(m).all():
        raise InvalidInputError("margin_fn: returned NaN or Inf margins")
    return m.detach().to(device=x.device, dtype=torch.float64)


def _linf_init(x: torch.Tensor, eps: float, u: torch.Tensor) -> torch.Tensor:
    """Vertical stripes: one +-eps sign per (channel, column)."""
    n, c, _, w = x.shape
    stripes = _signs(u).view(n, c, 1, w).to(x.dtype)
    return (x + eps * stripes).clamp(0, 1)


def _linf_step(x: torch.Tensor, x_best: torch.Tensor, eps: float, p: float, u: torch.Tensor) -> torch.Tensor:
    """One proposal: an s x s square (per channel +-2eps, so every pixel in it jumps to a vertex of the ball)."""
    n, c, h, w = x.shape
    s = min(max(int(round(math.sqrt(p * h * w))), 1), h, w)
    top, left = _positions(u[:, 0], h - s), _positions(u[:, 1], w - s)
    signs = _signs(u[:, 2 : 2 + c]).view(n, c, 1, 1).to(x.dtype)
    cand = x_best + _window_mask(top, left, s, h, w, x) * (2 * eps) * signs
    return torch.minimum(torch.maximum(cand, x - eps), x + eps).clamp(0, 1)


def _l2_init_layout(h: int, w: int) -> tuple[int, list[tuple[int, int]]]:
    """The reference's 5 x 5 grid of s x s windows (s = h // 5), centred; windows that would leave the image
    (small or non-square images, where the reference fails) are dropped."""
    s = max(h // 5, 1)
    start = max((h - 5 * s) // 2, 0)
    tops = [start + i * s for i in range(h // s) if start + (i + 1) * s <= h]
    lefts = [start + j * s for j in range(w // s) if start + (j + 1) * s <= w]
    return s, [(t, left) for t in tops for left in lefts]


def _l2_init(x: torch.Tensor, eps: float, u: torch.Tensor, s: int, windows: list[tuple[int, int]]) -> torch.Tensor:
    """Each window gets ``eta(s)`` (randomly transposed) with a random sign per channel; the sum is scaled to L2
    norm eps."""
    n, c = x.shape[:2]
    eta = _eta(s).to(device=x.device, dtype=x.dtype)
    u = u.view(n, len(windows), 1 + c)
    delta = torch.zeros_like(x)
    for k, (top, left) in enumerate(windows):
        bump = torch.where((u[:, k, 0] > 0.5).view(n, 1, 1), eta.T, eta)
        signs = _signs(u[:, k, 1:]).view(n, c, 1, 1).to(x.dtype)
        delta[:, :, top : top + s, left : left + s] += bump[:, None] * signs
    return (x + _l2_normalize(delta) * eps).clamp(0, 1)


def _l2_step(x: torch.Tensor, x_best: torch.Tensor, eps: float, p: float, u: torch.Tensor) -> torch.Tensor:
    """One proposal: window 1 gets a fresh signed ``eta`` plus its old (normalised) content, rescaled so it also
    absorbs window 2's mass (and any budget left); window 2 is cleared; the whole perturbation is put back on the
    eps-sphere."""
    n, c, h, w = x.shape
    s = max(int(round(math.sqrt(p * h * w))), 3)
    s = min(s + 1 if s % 2 == 0 else s, h, w)
    top1, left1 = _positions(u[:, 0], h - s), _positions(u[:, 1], w - s)
    top2, left2 = _positions(u[:, 2], h - s), _positions(u[:, 3], w - s)
    eta = _eta(s).to(device=x.device, dtype=x.dtype)
    bump = torch.where((u[:, 4] > 0.5).view(n, 1, 1), eta.T, eta)
    signs = _signs(u[:, 5 : 5 + c]).view(n, c, 1, 1).to(x.dtype)

    delta = x_best - x
    mask1 = _window_mask(top1, left1, s, h, w, x)
    mask2 = _window_mask(top2, left2, s, h, w, x)
    norms_window1 = (delta * mask1).pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()  # [n,c,1,1]
    norm_image = _l2_norm(delta)
    norm_windows = _l2_norm(delta * torch.maximum(mask1, mask2))

    # Place each sample's bump on its own window 1.
    canvas = torch.zeros(n, h, w, device=x.device, dtype=x.dtype)
    ar = torch.arange(s, device=x.device)
    rows, cols = (top1[:, None] + ar)[:, :, None], (left1[:, None] + ar)[:, None, :]
    canvas[torch.arange(n, device=x.device)[:, None, None], rows, cols] = bump
    new = canvas[:, None] * signs + delta * mask1 / (1e-12 + norms_window1)
    budget = ((eps**2 - norm_image**2).clamp(min=0) / c + norm_windows**2).sqrt()
    new = new / (1e-12 + new.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()) * budget

    delta = delta * (1 - mask2) * (1 - mask1) + new * mask1
    return (x + _l2_normalize(delta) * eps).clamp(0, 1)


def square_attack(
    margin_fn: MarginFn,
    x: torch.Tensor,
    *,
    eps: float,
    n_queries: int = 5000,
    p_init: float = 0.8,
    norm: str = "linf",
    seeds: Sequence[int] | torch.Tensor | None = None,
) -> SquareResult:
    """Drive ``margin_fn(x_subset, idx)`` below 0 inside the eps-ball (``eps`` in /255 units), with at most
    ``n_queries`` margin evaluations per image and no gradients.

    ``margin_fn`` is called under ``torch.no_grad()`` on the still-unsuccessful images only; ``idx`` gives their
    positions in ``x`` so it can pick their labels. Query 1 is the clean image, query 2 the norm's initial
    perturbation, then one proposal per query. ``x_adv`` is where each image's search ended: its adversarial
    example on success, the last accepted point otherwise, the clean image for those already at margin < 0.
    """
    if not callable(margin_fn):
        raise InvalidInputError(f"margin_fn: expected a callable (x_subset, idx) -> margins, got {margin_fn!r}")
    x = x.detach() if isinstance(x, torch.Tensor) else x
    check_images(x, "attack input")
    if norm not in NORMS:
        raise InvalidInputError(f"norm: expected one of {NORMS}, got {norm!r}")
    # An L2 budget may exceed one pixel's range: up to the diameter of the image cube.
    eps_px = check_eps(eps, "eps", upper=255.0 if norm == "linf" else 255.0 * math.sqrt(x[0].numel())) / 255.0
    check_positive_int(n_queries, "n_queries")
    if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0.0 < float(p_init) <= 1.0:
        raise InvalidInputError(f"p_init: expected a number in (0, 1], got {p_init!r}")
    seed_list = as_seed_list(seeds, x.shape[0])

    n, c, h, w = x.shape
    gens = [generator(derive_seed(seed, "square")) for seed in seed_list]
    queries = torch.zeros(n, dtype=torch.int64, device=x.device)
    x_best = x.clone()

    everyone = torch.arange(n, device=x.device)
    margin = _query(margin_fn, x, everyone)
    queries += 1

    def todo() -> torch.Tensor:
        return (margin >= 0).nonzero().flatten()

    idx = todo()
    if n_queries < 2 or idx.numel() == 0 or eps_px == 0:  # nothing left to try, or no room to move
        return SquareResult(x_best, queries, margin < 0)

    if norm == "linf":
        init = _linf_init(x[idx], eps_px, _draw(gens, idx, c * w, x.device))
        step = _linf_step
    else:
        s0, windows = _l2_init_layout(h, w)
        init = _l2_init(x[idx], eps_px, _draw(gens, idx, len(windows) * (1 + c), x.device), s0, windows)
        step = _l2_step
    # As in the reference, the search starts from the initial perturbation whatever its margin.
    x_best[idx] = init
    margin[idx] = _query(margin_fn, init, idx)
    queries[idx] += 1

    n_draws = (2 if norm == "linf" else 5) + c
    for it in range(n_queries - 2):
        idx = todo()
        if idx.numel() == 0:
            break
        p = p_selection(it, n_queries, p_init)
        cand = step(x[idx], x_best[idx], eps_px, p, _draw(gens, idx, n_draws, x.device))
        m = _query(margin_fn, cand, idx)
        queries[idx] += 1
        better = m < margin[idx]
        x_best[idx] = torch.where(better.view(-1, 1, 1, 1), cand, x_best[idx])
        margin[idx] = torch.where(better, m, margin[idx])
    return SquareResult(x_best, queries, margin < 0)


def defended_square(
    attack: Attack, adapter: TaskAdapter, x: torch.Tensor, y: Any, seeds: list[int], defense: Defense | None
) -> torch.Tensor:
    """``attack`` (a Square :class:`~equicore.attacks.attack.Attack`) on the scores of the defended model: the defense,
    when given, runs inside every query; a randomised defense is drawn afresh per query, from the image's own seed."""
    if adapter.task != "classification" or not isinstance(y, torch.Tensor) or y.ndim != 1:
        raise InvalidInputError(f"{attack.name}: the Square attack is defined for classification, not {adapter.task}")
    calls = [0]

    def defended_logits(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if defense is None:
            return adapter.logits(xs)
        call = calls[0]
        calls[0] += 1
        draw = [derive_seed(seeds[i], "square-query", call) for i in idx.tolist()]
        with torch.enable_grad():  # an optimising defense differentiates its own objective
            purified = defense.purify(adapter, xs, draw)
        return adapter.logits(purified)

    return square_attack(
        margin_loss(defended_logits, y, with_indices=True),
        x,
        eps=attack.eps,
        n_queries=attack.n_queries,
        p_init=attack.p_init,
        norm=attack.norm,
        seeds=seeds,
    ).x_adv
