"""Fashion-MNIST from its idx files (Debian package ``dataset-fashion-mnist``) and an in-memory array dataset."""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equicore.datasets.base import (
    Sample,
    SampleDataset,
    array_digest,
    default_data_dir,
    files_digest,
    select_indices,
)
from equicore.errors import DatasetError
from equicore.registry import DATASETS

# Where this dataset's loading code lives besides this module (for its code identity).
_MODULES = ("equicore.datasets.base",)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
# The validation split (``split: val``, for tuning: ``equi tune``): a fixed tail of the TRAIN idx files, never of the
# test files. The shipped fashion_cnn was trained on all 60000 train images (its model card), so no train image is
# unseen: these are in-distribution images the model has seen, and clean accuracy on them reads high. That is the
# least-bad choice that keeps the test split untouched (tuning compares settings with each other on them).
VAL_SOURCE_SPLIT = "train"
VAL_RANGE = (55000, 60000)
VAL_NOTE = (
    "Fashion-MNIST TRAIN images 55000..59999 (held out from the test split, but seen by the shipped fashion_cnn, "
    "which trained on all 60000): for tuning, not a test figure"
)
INSTALL_HINT = (
    "install it with `apt-get update && apt-get install -y dataset-fashion-mnist` (as root), "
    "or run `python scripts/prepare_data.py`"
)


def idx_files(root: Path, split: str) -> tuple[Path, Path]:
    prefix = _SPLIT_PREFIX[split]
    return root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"


def read_idx(path: Path) -> np.ndarray:
    """Decode one (gzipped) idx file: big-endian magic ``0 0 dtype ndim``, ``ndim`` uint32 sizes, then the data."""
    if not path.is_file():
        raise DatasetError(f"{path}: idx file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: cannot read idx file ({type(exc).__name__}: {exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: expected {expected} bytes of data for shape {dims}, got {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def resolve_fashion_root(root: str | os.PathLike[str] | None) -> Path:
    """An explicit ``root``, else the Debian package's folder, else ``<data dir>/fashion-mnist``."""
    if root is not None:
        p = Path(root).expanduser()
        if not p.is_dir():
            raise DatasetError(f"{p}: Fashion-MNIST root does not exist (expected a directory with idx .gz files)")
        return p
    for cand in (FASHION_MNIST_DIR, default_data_dir() / "fashion-mnist"):
        if cand.is_dir():
            return cand
    raise DatasetError(f"{FASHION_MNIST_DIR}: Fashion-MNIST is not installed; {INSTALL_HINT}")


@functools.lru_cache(maxsize=4)
def _load_split(root: str, split: str, stamp: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Images ``N x 28 x 28`` uint8 and labels ``N`` uint8, cached per process (``stamp`` = file sizes/mtimes)."""
    img_path, lab_path = idx_files(Path(root), split)
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{img_path}: image shape {images.shape} does not match labels {labels.shape}")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{lab_path}: label value {int(labels.max())} out of range (expected 0..9)")
    return images, labels


def load_fashion_mnist(root: str | os.PathLike[str] | None, split: str) -> tuple[np.ndarray, np.ndarray, Path]:
    """(images, labels, root) of one split; arrays are read-only views shared within the process."""
    if split not in _SPLIT_PREFIX:
        raise DatasetError(f"fashion_mnist: unknown split {split!r} (expected 'train' or 'test')")
    base = resolve_fashion_root(root)
    files = idx_files(base, split)
    for f in files:
        if not f.is_file():
            names = ", ".join(p.name for p in files)
            raise DatasetError(f"{base}: expected files {names} for the Fashion-MNIST {split} split (missing {f.name})")
    stamp = tuple(v for f in files for v in (f.stat().st_size, f.stat().st_mtime_ns))
    images, labels = _load_split(str(base), split, stamp)
    return images, labels, base


class ArrayClassificationDataset(SampleDataset):
    """Classification samples from uint8 arrays ``N x H x W`` (grey) or ``N x H x W x C``, kept in memory."""

    task = "classification"
    ignore_index = None

    def __init__(
        self,
        name: str,
        split: str,
        images: np.ndarray,
        labels: np.ndarray,
        ids: Sequence[str],
        class_names: Sequence[str],
        options: dict[str, Any],
        data_digest: str,
    ) -> None:
        self.name = name
        self.split = split
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self._images = images
        self._labels = labels
        self._ids = list(ids)
        self._opts = options
        self._digest = data_digest

    def __len__(self) -> int:
        return len(self._ids)

    def sample_id(self, index: int) -> str:
        return self._ids[index]

    def _load(self, index: int) -> Sample:
        arr = self._images[index]
        img = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).float().div_(255.0)
        img = img.unsqueeze(0) if img.ndim == 2 else img.permute(2, 0, 1).contiguous()
        return Sample(self._ids[index], img, int(self._labels[index]))

    def _options(self) -> dict[str, Any]:
        return self._opts


@DATASETS.register("fashion_mnist", task="classification", modules=_MODULES, test_split="test", validation_split="val")
def fashion_mnist(
    root: str | None = None,
    split: str = "test",
    limit: int | None = None,
    indices: Sequence[int] | None = None,
) -> ArrayClassificationDataset:
    """Fashion-MNIST, 1 x 28 x 28 images, 10 classes; ``split`` "train" (60k), "test" (10k) or "val" (5k: train
    images 55000..59999, for ``equi tune``; ids keep the train index, e.g. "val/055000").

    ``indices`` selects items of the split (ids keep the original index, e.g. "test/000123"); ``limit`` keeps the
    first ``limit`` of the selection. ``root`` defaults to /usr/share/datasets/fashion-mnist.
    """
    if split == "val":
        return _validation_split(root, limit, indices)
    images, labels, base = load_fashion_mnist(root, split)
    idx = select_indices(len(labels), indices, limit, "fashion_mnist")
    ids = [f"{split}/{i:06d}" for i in idx]
    digest = files_digest(idx_files(base, split)) + ":" + array_digest(idx)
    return ArrayClassificationDataset(
        "fashion_mnist",
        split,
        images[idx],
        labels[idx],
        ids,
        FASHION_CLASSES,
        {"limit": limit, "n": int(idx.size)},
        digest,
    )


def _validation_split(root: str | None, limit: int | None, indices: Sequence[int] | None) -> ArrayClassificationDataset:
    """``split: val``: train images ``VAL_RANGE`` (see :data:`VAL_NOTE`); the test files are never opened."""
    images, labels, base = load_fashion_mnist(root, VAL_SOURCE_SPLIT)
    lo, hi = VAL_RANGE
    if len(labels) < hi:
        raise DatasetError(
            f"{base}: the Fashion-MNIST val split is train images {lo}..{hi - 1}, but the train files hold "
            f"{len(labels)} images"
        )
    idx = lo + select_indices(hi - lo, indices, limit, "fashion_mnist")
    digest = files_digest(idx_files(base, VAL_SOURCE_SPLIT)) + ":" + array_digest(idx)
    ds = ArrayClassificationDataset(
        "fashion_mnist",
        "val",
        images[idx],
        labels[idx],
        [f"val/{i:06d}" for i in idx],
        FASHION_CLASSES,
        {"limit": limit, "n": int(idx.size)},
        digest,
    )
    ds.split_note = VAL_NOTE
    return ds
