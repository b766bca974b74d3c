"""Attack losses. Built outside the attack and passed in: ``LOSSES.build(name, adapter=..., labels=..., ...)``
returns ``loss_fn(x) -> [B]`` that the attack maximises. ``targeted=True`` means ``labels`` are the attack's targets
and the loss rises as predictions move towards them.

:func:`build_loss` wraps the registered loss in a :class:`BoundLoss`: the same callable, plus ``select(idx)`` (the
loss over a subset of the batch, for attacks that drop samples already fooled) and ``fooled`` (which samples the
last call found misclassified, from the same forward pass, for the class-logit losses that can tell).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from equicore.adapters.base import TaskAdapter
from equicore.adapters.segmentation import pixel_cross_entropy
from equicore.attacks.loop import LossFn
from equicore.errors import InvalidInputError
from equicore.registry import LOSSES


def _ignore_index(adapter: TaskAdapter) -> int | None:
    return getattr(adapter, "ignore_index", None) if adapter.task == "segmentation" else None


def _reduce(per_element: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean per sample over labelled positions (pixels for segmentation)."""
    if per_element.ndim == 1:
        return per_element
    if valid is None:
        return per_element.flatten(1).mean(1)
    v = valid.to(per_element.dtype).flatten(1)
    return (per_element.flatten(1) * v).sum(1) / v.sum(1).clamp_min(1)


def _split(logits: torch.Tensor, labels: torch.Tensor, ignore: int | None):
    """Scores of the labelled class and of the best other class, plus the valid mask."""
    valid = labels != ignore if ignore is not None else None
    safe = labels.masked_fill(~valid, 0) if valid is not None else labels
    true_score = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(safe, logits.shape[1]).movedim(-1, 1).bool(), float("-inf"))
    best_other, best_other_idx = others.max(1)
    return true_score, best_other, best_other_idx, valid


class LogitLoss:
    """A loss on the adapter's logits that also records, from the same forward pass, which samples the current
    iterate misclassifies (``fooled``; class logits only: for dense logits it stays None). ``fooled_against``: the
    labels misclassification is judged against (default: ``labels``, or for a targeted loss "predicts the target").
    """

    def __init__(
        self,
        adapter: TaskAdapter,
        value: Callable[[torch.Tensor], torch.Tensor],
        labels: torch.Tensor,
        targeted: bool,
        fooled_against: torch.Tensor | None = None,
    ) -> None:
        self.adapter, self.value, self.labels, self.targeted = adapter, value, labels, targeted
        self.fooled_against = fooled_against
        self.fooled: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.adapter.logits(x)
        if logits.ndim == 2:
            with torch.no_grad():
                pred = logits.argmax(1)
                if self.fooled_against is not None:
                    self.fooled = pred != self.fooled_against
                else:
                    self.fooled = pred == self.labels if self.targeted else pred != self.labels
        return self.value(logits)


# The pixel cross-entropy lives with the segmentation adapter (its task loss).
@LOSSES.register(
    "ce", tasks=("classification", "segmentation", "instance"), modules=("equicore.adapters.segmentation",)
)
def cross_entropy_loss(adapter: TaskAdapter, labels: torch.Tensor, targeted: bool = False) -> LossFn:
    """Cross-entropy (pixel-wise with ``ignore_index`` for segmentation); negated towards a target.

    For instance segmentation (no logit map) it is the model's own training loss, ``adapter.task_loss``, against
    the ground-truth instances (a list of target dicts); targeted attacks are not defined there.
    """
    if adapter.task == "instance":
        if targeted:
            raise InvalidInputError("attack loss 'ce': targeted attacks are not defined for the instance task")
        return lambda x: adapter.task_loss(x, labels)
    ignore = _ignore_index(adapter)
    sign = -1.0 if targeted else 1.0

    def value(logits: torch.Tensor) -> torch.Tensor:
        if ignore is not None:
            return sign * pixel_cross_entropy(logits, labels, ignore)
        return sign * F.cross_entropy(logits, labels, reduction="none")

    return LogitLoss(adapter, value, labels, targeted)


@LOSSES.register("cw", tasks=("classification", "segmentation"))
def cw_margin_loss(adapter: TaskAdapter, labels: torch.Tensor, targeted: bool = False, kappa: float = 0.0) -> LossFn:
    """Carlini-Wagner margin: untargeted maximises min(max_{j!=y} z_j - z_y, kappa); targeted maximises
    min(z_t - max_{j!=t} z_j, kappa). Capping at ``kappa`` stops spending budget on already-fooled samples."""
    if kappa < 0 or not math.isfinite(kappa):
        raise InvalidInputError(f"cw.kappa: expected a finite value >= 0, got {kappa!r}")
    ignore = _ignore_index(adapter)

    def value(logits: torch.Tensor) -> torch.Tensor:
        true_score, best_other, _, valid = _split(logits, labels, ignore)
        margin = (true_score - best_other) if targeted else (best_other - true_score)
        return _reduce(margin.clamp(max=kappa), valid)

    return LogitLoss(adapter, value, labels, targeted)


class _Probit(torch.autograd.Function):
    """Phi(m) with the analytic gradient phi(m) * grad_output.

    The official Houdini code returns phi(m) * task_loss from backward and ignores grad_output, so any sign or scale
    applied to the loss downstream is silently dropped; honouring grad_output keeps the chain rule intact.
    """

    @staticmethod
    def forward(ctx, margin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(margin)
        return 0.5 * (1.0 + torch.erf(margin / math.sqrt(2.0)))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (margin,) = ctx.saved_tensors
        density = torch.exp(-0.5 * margin.pow(2)) / math.sqrt(2.0 * math.pi)
        return grad_output * density


@LOSSES.register("houdini", tasks=("segmentation",))
def houdini_loss(adapter: TaskAdapter, labels: torch.Tensor, targeted: bool = False) -> LossFn:
    """Houdini (Cisse et al. 2017): P_{gamma~N(0,1)}[g(y) - g(y_hat) < gamma] * l(y, y_hat) per pixel, i.e. the
    probit of the score margin times the task loss, averaged over labelled pixels.

    Untargeted: y is the ground truth and y_hat the best-scoring other label, so l(y, y_hat) = 1 (pixel 0-1 loss)
    and the surrogate is Phi(s_yhat - s_y). Targeted: the margin is taken from the best non-target label towards
    the target, and the loss rises as the target wins.
    """
    if adapter.task != "segmentation":
        raise InvalidInputError(f"houdini is defined for segmentation, not {adapter.task!r}")
    ignore = _ignore_index(adapter)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        true_score, best_other, best_idx, valid = _split(adapter.logits(x), labels, ignore)
        margin = (true_score - best_other) if targeted else (best_other - true_score)
        task_loss = torch.ones_like(margin)  # l(y, y_hat): the 0-1 loss of the competing label, detached by nature
        return _reduce(_Probit.apply(margin) * task_loss, valid)

    return loss_fn


@LOSSES.register("dlr", tasks=("classification", "segmentation"))
def dlr_loss(
    adapter: TaskAdapter, labels: torch.Tensor, targeted: bool = False, true_labels: torch.Tensor | None = None
) -> LossFn:
    """Difference of Logits Ratio (Croce & Hein 2020): shift- and scale-invariant in the logits, so a defense that
    rescales them (or saturates the softmax) cannot hide the gradient the way it can from cross-entropy.

    Untargeted (``labels`` = ground truth): ``-(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3)``, pi the logits sorted in
    decreasing order (needs >= 3 classes). Targeted (APGD-T; ``labels`` = targets, ``true_labels`` = ground truth,
    required): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (needs >= 4 classes). For segmentation both are
    per pixel, averaged over labelled pixels.
    """
    if targeted and true_labels is None:
        raise InvalidInputError("attack loss 'dlr': the targeted DLR loss needs true_labels (the ground truth)")
    ignore = _ignore_index(adapter)
    truth = true_labels if targeted else labels
    need = 4 if targeted else 3

    def value(logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] < need:
            kind = "targeted DLR" if targeted else "DLR"
            raise InvalidInputError(
                f"attack loss 'dlr': the {kind} loss needs >= {need} classes, got {logits.shape[1]}"
            )
        valid = truth != ignore if ignore is not None else None
        y = truth.masked_fill(~valid, 0) if valid is not None else truth
        ranked = logits.sort(dim=1, descending=True).values
        z_y = logits.gather(1, y.unsqueeze(1)).squeeze(1)
        if targeted:
            t = labels.masked_fill(~valid, 0) if valid is not None else labels
            z_t = logits.gather(1, t.unsqueeze(1)).squeeze(1)
            per = -(z_y - z_t) / (ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, 3]) + 1e-12)
        else:
            top_is_y = (logits.argmax(1) == y).to(logits.dtype)
            best_other = ranked[:, 1] * top_is_y + ranked[:, 0] * (1 - top_is_y)
            per = -(z_y - best_other) / (ranked[:, 0] - ranked[:, 2] + 1e-12)
        return _reduce(per, valid)

    return LogitLoss(adapter, value, labels, targeted, fooled_against=true_labels if targeted else None)


def take(labels: Any, idx: torch.Tensor) -> Any:
    """The labels of the samples at positions ``idx`` (a label tensor, or a list of instance target dicts)."""
    if isinstance(labels, torch.Tensor):
        return labels[idx.to(labels.device)]
    return [labels[i] for i in idx.tolist()]


class BoundLoss:
    """A registered loss bound to its adapter and labels. ``select(idx)`` rebuilds it over a subset of the batch;
    ``fooled`` is what the built loss recorded on its last call (None if it cannot tell)."""

    def __init__(self, name: str, adapter: TaskAdapter, labels: Any, targeted: bool, params: dict[str, Any]) -> None:
        self.name, self.adapter, self.labels, self.targeted, self.params = name, adapter, labels, targeted, params
        self._loss = LOSSES.build(name, adapter=adapter, labels=labels, targeted=targeted, **params)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._loss(x)

    @property
    def fooled(self) -> torch.Tensor | None:
        return getattr(self._loss, "fooled", None)

    def select(self, idx: torch.Tensor) -> BoundLoss:
        params = {
            k: take(v, idx) if isinstance(v, torch.Tensor | Sequence) and k.endswith("labels") else v
            for k, v in self.params.items()
        }
        return BoundLoss(self.name, self.adapter, take(self.labels, idx), self.targeted, params)


def build_loss(name: str, adapter: TaskAdapter, labels: Any, targeted: bool = False, **params) -> BoundLoss:
    tasks = LOSSES.meta(name).get("tasks", ())
    if tasks and adapter.task not in tasks:
        raise InvalidInputError(f"attack loss {name!r} is not defined for task {adapter.task!r} (only {list(tasks)})")
    return BoundLoss(name, adapter, labels, targeted, params)
