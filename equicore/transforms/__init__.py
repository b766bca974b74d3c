"""Invertible transforms (g, g^-1) and the default view sets of the paper."""

from equicore.transforms.base import Compose, InvertibleTransform, Params
from equicore.transforms.library import ColorJitter, HorizontalFlip, Identity, Resize, Rotate
from equicore.transforms.views import TRANSFORM_MODULES, VIEW_SETS, build_views, paper_views

__all__ = [
    "TRANSFORM_MODULES",
    "VIEW_SETS",
    "ColorJitter",
    "Compose",
    "HorizontalFlip",
    "Identity",
    "InvertibleTransform",
    "Params",
    "Resize",
    "Rotate",
    "build_views",
    "paper_views",
]
