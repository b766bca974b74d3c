"""Figure-2 examples: for a run's first ``report.examples`` samples, the clean, attacked and restored images, the
model's prediction on each, and its per-view predictions g^-1 F(g x) under the run's ``measure.views``.

Which samples are examples depends only on their position in the run's sample order, and every example is computed
on its own (batch of one) with the measure's view parameters, so the examples do not depend on the sharding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from equicore.equivariance import sample_view_params, view_features
from equicore.seeding import derive_seed
from equicore.transforms import build_views
from equicore.transforms.base import InvertibleTransform, Params
from storage.examples import EXAMPLE_STATES
from tasks.png import encode_png, label_dtype

DEFAULT_LABELS = 256  # label-map range when the dataset does not say how many classes it has


def example_slots(shard: int, shard_size: int, n_examples: int, n_in_shard: int) -> list[int]:
    """Positions within a shard of the samples that are among the run's first ``n_examples``."""
    first = shard * shard_size
    return [j for j in range(n_in_shard) if first + j < n_examples]


def image_uint8(x: torch.Tensor) -> np.ndarray:
    """C x H x W in [0, 1] -> H x W (one channel) or H x W x 3 uint8 (other channel counts: the first channel)."""
    a = (x.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
    if a.shape[0] == 3:
        return a.permute(1, 2, 0).contiguous().numpy()
    return a[0].contiguous().numpy()


def merge_instances(instances: dict[str, Any], size: tuple[int, int]) -> torch.Tensor:
    """Masks of one image's instances merged into an H x W label map (0 = background); where instances overlap the
    higher-scoring one (or, for targets without scores, the later one) wins."""
    out = torch.zeros(size, dtype=torch.long)
    masks, labels = instances["masks"].cpu().bool(), instances["labels"].cpu().long()
    scores = instances.get("scores")
    order = torch.argsort(scores.cpu(), stable=True).tolist() if scores is not None else range(len(labels))
    for i in order:
        out[masks[i]] = labels[i]
    return out


def encode_label_map(labels: torch.Tensor, num_labels: int, ignore_index: int | None = None) -> bytes:
    """H x W class indices -> PNG; the ignore index and out-of-range values become the no-label value."""
    dtype, no_label = label_dtype(num_labels)
    lab = labels.detach().cpu().long()
    bad = (lab < 0) | (lab >= num_labels)
    if ignore_index is not None:
        bad |= lab == ignore_index
    return encode_png(lab.masked_fill(bad, no_label).numpy().astype(dtype))


def view_label(view: InvertibleTransform, params: Params) -> str:
    if "size" in params and view.name == "resize":
        return f"resize {params['size'][0]}x{params['size'][1]}"
    if "angle" in params:
        return f"{view.name} {params['angle']:+.0f}"
    return view.name


def _classify(adapter, x: torch.Tensor, size: tuple[int, int]) -> tuple[int, bool]:
    """(class of x, whether x had to be resampled to the model's input size: heads with fixed-size layers)."""
    try:
        return int(adapter.predict(x)[0]), False
    except RuntimeError:
        if tuple(x.shape[-2:]) == tuple(size):
            raise
        resampled = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return int(adapter.predict(resampled)[0]), True


class ExampleMaker:
    """Per-sample predictions for the examples of one run (the task's adapter, classes and the measure's views)."""

    def __init__(self, adapter, task: str, num_classes: int | None, ignore_index: int | None, views, seed: int):
        self.adapter, self.task = adapter, task
        self.num_labels = int(num_classes or DEFAULT_LABELS)
        self.ignore_index = ignore_index
        self.views = build_views(views)
        self.seed = derive_seed(seed, "measure")  # the equivariance measure's view parameters

    def _label_map(self, value: Any, size: tuple[int, int]) -> bytes:
        if self.task == "instance":
            return encode_label_map(merge_instances(value, size), self.num_labels)
        return encode_label_map(value, self.num_labels, self.ignore_index)

    def target(self, y: Any, size: tuple[int, int]) -> tuple[int, bytes | None]:
        if self.task == "classification":
            return int(y), None
        return -1, self._label_map(y, size)

    def predict(self, x: torch.Tensor) -> tuple[int, bytes | None]:
        """x: 1 x C x H x W."""
        size = tuple(x.shape[-2:])
        if self.task == "classification":
            return int(self.adapter.predict(x)[0]), None
        return -1, self._label_map(self.adapter.predict(x)[0], size)

    def per_view(self, x: torch.Tensor) -> tuple[list[str], list[int], list[bytes]]:
        """(view labels, classes of g x, PNGs of argmax g^-1 F(g x)); pixels a view did not see are no-label."""
        size = tuple(x.shape[-2:])
        params = sample_view_params(self.views, self.seed, size)
        names = [view_label(v, p) for v, p in zip(self.views, params, strict=True)]
        if self.task == "classification":
            preds = []
            for i, (v, p) in enumerate(zip(self.views, params, strict=True)):
                cls, resampled = _classify(self.adapter, v.forward(x, p), size)
                preds.append(cls)
                names[i] += " (resampled)" if resampled else ""
            return names, preds, []
        if self.task == "segmentation":
            vf = view_features(self.adapter.logits, x, self.views, params, batched=False)
            maps = [self._masked(inv.argmax(1)[0], mask) for inv, mask in zip(vf.inverted, vf.masks, strict=True)]
            return names, [], maps
        maps = []
        for v, p in zip(self.views, params, strict=True):  # instance: invert the one-hot merged label map
            xv = v.forward(x, p)
            merged = merge_instances(self.adapter.predict(xv)[0], tuple(xv.shape[-2:]))
            onehot = F.one_hot(merged.clamp_max(self.num_labels - 1), self.num_labels).permute(2, 0, 1)[None]
            inv = v.inverse(onehot.float().to(x.device), p, size)
            maps.append(self._masked(inv.argmax(1)[0], v.valid_mask(p, size, device=x.device)))
        return names, [], maps

    def _masked(self, labels: torch.Tensor, mask: torch.Tensor | None) -> bytes:
        if mask is not None:
            labels = labels.masked_fill(~mask[0, 0].to(labels.device), -1)
        return encode_label_map(labels, self.num_labels)

    def row(self, images: Sequence[torch.Tensor], y: Any) -> dict[str, Any]:
        """One example: ``images`` = (clean, attacked, restored), each C x H x W; ``y`` its target."""
        size = tuple(images[0].shape[-2:])
        label, label_map = self.target(y, size)
        _, no_label = label_dtype(self.num_labels)
        row: dict[str, Any] = {"task": self.task, "label": label, "label_map": label_map, "ignore_label": no_label}
        with torch.no_grad():
            for state, img in zip(EXAMPLE_STATES, images, strict=True):
                x = img[None]
                pred, pred_map = self.predict(x)
                names, view_preds, view_maps = self.per_view(x)
                row.update(
                    {
                        f"{state}_image": encode_png(image_uint8(img)),
                        f"{state}_pred": pred,
                        f"{state}_pred_map": pred_map,
                        f"{state}_view_preds": view_preds,
                        f"{state}_view_pred_maps": view_maps,
                    }
                )
                row["view_names"] = names
        return row
