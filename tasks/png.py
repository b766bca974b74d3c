"""Lossless PNG bytes for uint8 images and integer label maps (numpy + Pillow; no torch, so the report can use it).

Encoding is deterministic: no metadata chunks, fixed compression level.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

NO_LABEL_8 = 255  # unlabelled / unseen pixel in a uint8 label map
NO_LABEL_16 = 65535  # the same in a uint16 label map (more than 255 classes)


def encode_png(array: np.ndarray) -> bytes:
    """H x W (uint8 or uint16) or H x W x 3 (uint8) -> PNG bytes."""
    a = np.ascontiguousarray(array)
    if (a.dtype == np.uint16 and a.ndim == 2) or (a.dtype == np.uint8 and (a.ndim == 2 or a.shape[2:] == (3,))):
        img = Image.fromarray(a.astype(a.dtype.newbyteorder("<")) if a.dtype == np.uint16 else a)  # L, RGB or I;16
    else:
        raise ValueError(f"encode_png: expected H x W uint8/uint16 or H x W x 3 uint8, got {a.dtype} {a.shape}")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> the array :func:`encode_png` was given."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode.startswith("I"):
            return np.asarray(img).astype(np.uint16)
        return np.array(img if img.mode in ("L", "RGB") else img.convert("RGB"))


def label_dtype(num_labels: int) -> tuple[type, int]:
    """(dtype, no-label value) of a label map for ``num_labels`` classes."""
    return (np.uint8, NO_LABEL_8) if num_labels < NO_LABEL_8 else (np.uint16, NO_LABEL_16)
