"""Per-pixel attack losses for semantic segmentation from SEA, the Segmentation Ensemble Attack of Croce, Singh &
Hein (2024), "Towards reliable evaluation and fast training of robust semantic segmentation models".

Reference implementation: github.com/nmndeep/Robust-Segmentation, ``semseg/attacker.py`` (the losses of the released
SEA: ``mask-ce-avg``, ``mask-ce-bal``, ``js-avg``) and ``semseg/utils/attacker.py`` (the earlier loss collection,
which also holds the masked spherical loss, ``mask-norm-corrlog-avg``, and its targeted form).
``HalmosiL/Robust-Segmentation-Evaluation`` (``rse/_sea.py``) vendors the same functions unchanged.

Every factory here follows :mod:`equicore.attacks.losses`: ``(adapter, labels, targeted=False, **params)`` returns
``loss_fn(x) -> [B]``, which the attack maximises. ``labels`` is ``[B, H, W]``; pixels labelled
``adapter.ignore_index`` never count. ``targeted=True`` means ``labels`` are the attack's target map and the loss
rises as predictions move towards it.

Normalisation. The reference reduces a per-pixel loss map to one value per image with ``pixel_to_img_loss``: the
sum over labelled pixels divided by *all* H*W pixels (ignored pixels count as zeros in the mean), and the masked
losses are divided by that same count, *not* by the number of still-correct pixels. Here every loss is the sum over
labelled pixels divided by the number of labelled pixels (the project's convention, as in ``pixel_cross_entropy``):
identical to the reference when no pixel is ignored, otherwise the reference value times H*W / n_labelled, a
per-image constant that changes no step direction. An image with no labelled pixel gives 0.

Masks. The masked losses decide per call, from the current logits and without gradient, which pixels count:
untargeted, the labelled pixels still classified correctly (``argmax == y``), as in the reference; targeted, the
labelled pixels not yet predicting their target (``argmax != t``). The reference's targeted spherical loss masks by
"still correct w.r.t. the ground truth" instead, which a targeted loss here cannot do: it is given only the targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from equicore.adapters import TaskAdapter
from equicore.attacks.loop import LossFn
from equicore.errors import InvalidInputError
from equicore.registry import LOSSES

SPHERICAL_SCORES = ("logits", "probs")
# Every registered loss is called through ``losses.BoundLoss``.
_MODULES = ("equicore.attacks.losses",)


def _check_task(name: str, adapter: TaskAdapter) -> int:
    if adapter.task != "segmentation":
        raise InvalidInputError(f"attack loss {name!r} is defined for segmentation, not {adapter.task!r}")
    return int(getattr(adapter, "ignore_index", 255))


def _pixels(name: str, logits: torch.Tensor, labels: torch.Tensor, ignore: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels with ignored pixels set to class 0 (safe to gather with), and the labelled-pixel mask ``[B, H, W]``."""
    if logits.ndim != 4:
        raise InvalidInputError(f"{name}: expected dense logits B x C x H x W, got shape {tuple(logits.shape)}")
    b, c, h, w = logits.shape
    if labels.shape != (b, h, w):
        raise InvalidInputError(f"{name}: labels: expected shape {(b, h, w)}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InvalidInputError(f"{name}: labels: expected integer class indices, got {labels.dtype}")
    labels = labels.to(logits.device)
    valid = labels != ignore
    safe = labels.masked_fill(~valid, 0).long()
    if valid.any() and (int(safe.min()) < 0 or int(safe.max()) >= c):
        raise InvalidInputError(
            f"{name}: labels: values must be class indices in [0, {c}) or the ignore index {ignore}, "
            f"got range [{int(labels[valid].min())}, {int(labels[valid].max())}]"
        )
    return safe, valid


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _labelled_mean(per_pixel: torch.Tensor, valid: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
    """Per image: the sum of ``per_pixel`` over the ``counted`` pixels (default: all labelled ones) divided by the
    number of labelled pixels; 0 for an image with no labelled pixel."""
    keep = valid if counted is None else counted & valid
    kept = torch.where(keep, per_pixel, torch.zeros_like(per_pixel)).flatten(1)
    acc = _accumulator(per_pixel.dtype)  # half precision would overflow counting a large image's pixels
    total = kept.sum(1, dtype=acc) / valid.flatten(1).sum(1).clamp_min(1).to(acc)
    return total.to(per_pixel.dtype)


def _active(logits: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor, targeted: bool) -> torch.Tensor:
    """The pixels a masked loss counts at this iterate (no gradient): still correct, or not yet at the target."""
    with torch.no_grad():
        pred = logits.argmax(1)
        hit = pred == safe
    return valid & (~hit if targeted else hit)


def _class_counts(safe: torch.Tensor, valid: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Labelled pixels of each class in each image ``[B, C]``."""
    counts = torch.zeros(safe.shape[0], num_classes, dtype=dtype, device=safe.device)
    return counts.scatter_add_(1, safe.flatten(1), valid.flatten(1).to(dtype))


@LOSSES.register("masked_ce", tasks=("segmentation",), modules=_MODULES)
def masked_cross_entropy_loss(adapter: TaskAdapter, labels: torch.Tensor, targeted: bool = False) -> LossFn:
    """SEA's masked cross-entropy (``mask-ce-avg``): per-pixel CE counted only on pixels the current iterate still
    classifies correctly, so the attack stops spending effort on pixels already flipped.

    Untargeted: ``L = (1/n) * sum_{i labelled} 1[argmax u_i = y_i] * CE(u_i, y_i)``, with ``n`` the number of
    labelled pixels (not of the still-correct ones: the reference divides by all pixels too) and the indicator
    recomputed at every call from the current logits, without gradient.

    Targeted (not in the reference; the same construction towards ``t``):
    ``L = -(1/n) * sum_i 1[argmax u_i != t_i] * CE(u_i, t_i)``, counting only pixels not yet at their target.

    Reference: nmndeep/Robust-Segmentation ``semseg/attacker.py``, ``masked_cross_entropy`` with
    ``pixel_to_img_loss``.
    """
    ignore = _check_task("masked_ce", adapter)
    sign = -1.0 if targeted else 1.0

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        logits = adapter.logits(x)
        safe, valid = _pixels("masked_ce", logits, labels, ignore)
        ce = F.cross_entropy(logits, safe, reduction="none")
        active = _active(logits, safe, valid, targeted)
        return sign * _labelled_mean(ce, valid, active)

    return loss_fn


@LOSSES.register("masked_ce_balanced", tasks=("segmentation",), modules=_MODULES)
def masked_balanced_cross_entropy_loss(
    adapter: TaskAdapter,
    labels: torch.Tensor,
    targeted: bool = False,
    class_weights: Sequence[float] | torch.Tensor | None = None,
) -> LossFn:
    """SEA's class-balanced masked cross-entropy (``mask-ce-bal``, the first attack of the released SEA): the masked
    CE with each pixel weighted by the weight of its class.

    Untargeted: ``L = (1/n) * sum_{i labelled} 1[argmax u_i = y_i] * w_{y_i} * CE(u_i, y_i)`` (a weighted sum over
    the ``n`` labelled pixels, not a weighted mean: ``F.cross_entropy(weight=w, reduction="none")`` as in the
    reference). Targeted (not in the reference): ``L = -(1/n) * sum_i 1[argmax u_i != t_i] * w_{t_i} * CE(u_i, t_i)``.

    ``class_weights``: one finite weight >= 0 per class, used as given. The reference's SEA driver passes fixed
    per-dataset lists ("class balance pre-computed weights": ``VOC_WTS`` / ``ADE_WTS`` in ``semseg/utils/utils.py``
    of later versions), which sum to 1 and give rare classes large weights (VOC's dominant background: 0.0007),
    i.e. they fall with class frequency. When omitted, inverse frequency is applied to each image's own labels:
    ``w_c = (1/n_c) / sum_{c' present} (1/n_c')`` over the classes present among its labelled pixels (of the
    targets when targeted), so a one-class image reduces to ``masked_ce``. Pass the dataset's weights to
    reproduce the reference exactly.

    Reference: nmndeep/Robust-Segmentation ``semseg/attacker.py``, ``masked_cross_entropy_balanced``
    (``mask-ce-bal``), with ``pixel_to_img_loss``.
    """
    ignore = _check_task("masked_ce_balanced", adapter)
    fixed: torch.Tensor | None = None
    if class_weights is not None:
        fixed = torch.as_tensor(class_weights, dtype=torch.float64).detach()
        if fixed.ndim != 1 or fixed.numel() == 0:
            raise InvalidInputError(
                f"masked_ce_balanced.class_weights: expected one weight per class, got shape {tuple(fixed.shape)}"
            )
        if not torch.isfinite(fixed).all() or bool((fixed < 0).any()):
            raise InvalidInputError("masked_ce_balanced.class_weights: expected finite weights >= 0")
    sign = -1.0 if targeted else 1.0

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        logits = adapter.logits(x)
        safe, valid = _pixels("masked_ce_balanced", logits, labels, ignore)
        num_classes = logits.shape[1]
        if fixed is not None:
            if fixed.numel() != num_classes:
                raise InvalidInputError(
                    f"masked_ce_balanced.class_weights: got {fixed.numel()} weights for {num_classes} classes"
                )
            pixel_weight = fixed.to(logits.device, logits.dtype)[safe]
        else:
            counts = _class_counts(safe, valid, num_classes, _accumulator(logits.dtype))
            inv = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
            per_image = inv / inv.sum(1, keepdim=True).clamp_min(torch.finfo(inv.dtype).tiny)
            pixel_weight = per_image.gather(1, safe.flatten(1)).view_as(safe).to(logits.dtype)
        ce = F.cross_entropy(logits, safe, reduction="none")
        active = _active(logits, safe, valid, targeted)
        return sign * _labelled_mean(pixel_weight * ce, valid, active)

    return loss_fn


@LOSSES.register("js", tasks=("segmentation",), modules=_MODULES)
def jensen_shannon_loss(adapter: TaskAdapter, labels: torch.Tensor, targeted: bool = False) -> LossFn:
    """SEA's Jensen-Shannon loss (``js-avg``): the JS divergence between the softmax ``p_i`` and the one-hot label,
    per pixel, averaged over labelled pixels (no mask: it saturates by itself, at ``log 2``, once a pixel's
    label probability reaches 0).

    ``JS(p, e_y) = 1/2 KL(p || m) + 1/2 KL(e_y || m)``, ``m = (p + e_y) / 2``, which depends on ``p_y`` only:
    ``JS = log 2 + 1/2 * (p_y log p_y - (1 + p_y) log(1 + p_y))``; computed in that closed form (from the
    log-softmax, so no ``log 0`` arises), equal to the reference's two ``F.kl_div`` terms summed over classes.
    Untargeted: ``L = (1/n) * sum_{i labelled} JS(p_i, e_{y_i})``. Targeted (not in the reference):
    ``L = -(1/n) * sum_i JS(p_i, e_{t_i})``.

    Reference: nmndeep/Robust-Segmentation ``semseg/attacker.py``, ``js_div_fn`` and ``js_loss`` (sum over classes,
    then ``pixel_to_img_loss``).
    """
    ignore = _check_task("js", adapter)
    sign = -1.0 if targeted else 1.0

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        logits = adapter.logits(x)
        safe, valid = _pixels("js", logits, labels, ignore)
        log_p = F.log_softmax(logits, 1).gather(1, safe.unsqueeze(1)).squeeze(1)
        p = log_p.exp()
        js = math.log(2.0) + 0.5 * (p * log_p - (1.0 + p) * torch.log1p(p))
        return sign * _labelled_mean(js, valid)

    return loss_fn


@LOSSES.register("masked_spherical", tasks=("segmentation",), modules=_MODULES)
def masked_spherical_loss(
    adapter: TaskAdapter, labels: torch.Tensor, targeted: bool = False, scores: str = "logits"
) -> LossFn:
    """SEA's masked spherical loss (``mask-norm-corrlog-avg``): minus the label's score after projecting each
    pixel's score vector onto the unit sphere, counted only on pixels still classified correctly.

    Untargeted: ``L = -(1/n) * sum_{i labelled} 1[argmax u_i = y_i] * s_{i,y_i} / ||s_i||_2`` (maximising it pushes
    the label's normalised score down); the norm is differentiated, as in the reference. Targeted (the reference's
    ``mask-norm-corrlog-avg-targeted``): ``L = (1/n) * sum_i 1[argmax u_i != t_i] * s_{i,t_i} / ||s_i||_2``; the
    reference masks with "still correct w.r.t. the ground truth", which is not available here (see the module
    docstring), so pixels not yet at their target count.

    ``scores``: ``"logits"`` (default, what the reference normalises: ``s = u``, the ``single_logits_loss(...,
    normalized=True, masked=True)`` it runs in SEA) or ``"probs"`` (``s = softmax(u)``: the spherical scoring rule
    ``p_y / ||p||_2`` proper). Values lie in ``[-1, 1]``.

    Reference: nmndeep/Robust-Segmentation ``semseg/utils/attacker.py``, ``single_logits_loss`` and
    ``targeted_single_logits_loss`` with ``normalized=True, masked=True``; run as the fourth SEA loss in
    ``tools/worse_case_miou.py``.
    """
    ignore = _check_task("masked_spherical", adapter)
    if scores not in SPHERICAL_SCORES:
        raise InvalidInputError(f"masked_spherical.scores: expected one of {SPHERICAL_SCORES}, got {scores!r}")
    sign = 1.0 if targeted else -1.0

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        logits = adapter.logits(x)
        safe, valid = _pixels("masked_spherical", logits, labels, ignore)
        s = logits if scores == "logits" else F.softmax(logits, 1)
        norm = s.norm(dim=1).clamp_min(torch.finfo(s.dtype).tiny)
        label_score = s.gather(1, safe.unsqueeze(1)).squeeze(1) / norm
        active = _active(logits, safe, valid, targeted)
        return sign * _labelled_mean(label_score, valid, active)

    return loss_fn
