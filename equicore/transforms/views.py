"""View sets: the list of transforms g_1..g_K the equivariance loss compares against.

``paper`` is the paper's K=8 (section 4.4): four resizes in 0.3x-2x, one colour jitter, one horizontal flip and two
rotations within +/-15 degrees. The ablation sets are Table 5's; ``paper_k<N>`` keeps the first N of ``paper``'s
ordering extended cyclically (Figure 3's sweep over K).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from equicore.errors import InvalidInputError
from equicore.registry import TRANSFORMS, Registry
from equicore.transforms.base import Compose, InvertibleTransform
from equicore.transforms.library import ColorJitter, HorizontalFlip, Resize, Rotate

# The modules a view's maths live in: what the code identity of anything that draws views covers.
TRANSFORM_MODULES = (
    "equicore.transforms.base",
    "equicore.transforms.functional",
    "equicore.transforms.library",
    "equicore.transforms.views",
)

# Name -> factory of a fresh list of views (``VIEW_SETS.build("paper")``, or ``VIEW_SETS["paper"]()``).
VIEW_SETS: Registry[list[InvertibleTransform]] = Registry("view set", base_cls=list)


def paper_views() -> list[InvertibleTransform]:
    return [
        Resize((0.3, 0.75)),
        Resize((0.75, 1.0)),
        Resize((1.0, 1.5)),
        Resize((1.5, 2.0)),
        ColorJitter(0.3, 0.3, 0.3, grayscale_p=0.2),
        HorizontalFlip(),
        Rotate((-15.0, 15.0)),
        Rotate((-15.0, 15.0)),
    ]


def simclr_views() -> list[InvertibleTransform]:
    """The contrastive defense's K=4 augmentations in the spirit of SimCLR (Chen et al. 2020), built from the
    invertible transforms (there is no crop): a rescale or a small rotation, with or without a flip, each followed by
    colour jitter (0.4) with grayscale p=0.2."""

    def jitter() -> ColorJitter:
        return ColorJitter(0.4, 0.4, 0.4, grayscale_p=0.2)

    return [
        Compose([Resize((0.75, 1.25)), jitter()]),
        Compose([HorizontalFlip(), Resize((0.75, 1.25)), jitter()]),
        Compose([Rotate((-15.0, 15.0)), jitter()]),
        Compose([HorizontalFlip(), Rotate((-15.0, 15.0)), jitter()]),
    ]


def _paper_k(k: int) -> list[InvertibleTransform]:
    base = paper_views()
    return [base[i % len(base)] for i in range(k)]


_VIEW_SETS = {
    "paper": paper_views,
    "flip": lambda: [HorizontalFlip()],
    "resize": lambda: [Resize((0.3, 0.75)), Resize((0.75, 1.0)), Resize((1.0, 1.5)), Resize((1.5, 2.0))],
    "rotate15": lambda: [Rotate((-15.0, 15.0)), Rotate((-15.0, 15.0))],
    "rotate90": lambda: [Rotate((90.0, 180.0)), Rotate((-180.0, -90.0))],
    "color": lambda: [ColorJitter(0.3, 0.3, 0.3, grayscale_p=0.2)],
    "simclr": simclr_views,
    **{f"paper_k{k}": (lambda k=k: _paper_k(k)) for k in (1, 2, 4, 6, 8, 12, 16, 20)},
}
for _name, _factory in _VIEW_SETS.items():
    VIEW_SETS.add(_name, _factory, modules=TRANSFORM_MODULES)


def build_transform(spec: str | Mapping[str, Any]) -> InvertibleTransform:
    """``"hflip"`` or ``{"name": "resize", "scale": [0.5, 2]}`` or ``{"name": "compose", "transforms": [...]}``."""
    if isinstance(spec, str):
        return TRANSFORMS.build(spec)
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise InvalidInputError(f"view: expected a transform name or a mapping with 'name', got {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name"}
    if spec["name"] == "compose":
        return Compose([build_transform(s) for s in params.get("transforms", [])])
    return TRANSFORMS.build(spec["name"], **params)


def build_views(spec: str | Sequence[str | Mapping[str, Any]]) -> list[InvertibleTransform]:
    """A view-set name from :data:`VIEW_SETS` or an explicit list of transform specs."""
    if isinstance(spec, str):
        if spec not in VIEW_SETS:
            raise InvalidInputError(f"views: {VIEW_SETS.unknown_message(spec)}")
        return VIEW_SETS.build(spec)
    views = [build_transform(s) for s in spec]
    if not views:
        raise InvalidInputError("views: needs at least one transform")
    return views
