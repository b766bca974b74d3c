"""Samples, the dataset base class, image/label file helpers and ``collate``.

Every loader returns ``Sample(sample_id, image, target)`` with ``image`` a float32 ``C x H x W`` tensor in [0, 1]
and a target whose form depends on ``task`` (see docs/ARCHITECTURE.md). Errors on bad files raise
``DatasetError`` with one line naming the path and what was expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from equicore.environment import ALLOW_OUTSIDE_ROOTS_ENV, outside_roots_allowed  # noqa: F401  (re-exported)
from equicore.errors import DatasetError

TASKS = ("classification", "segmentation", "instance")
IGNORE_INDEX = 255

# Photos are decoded fully (``load``) so a truncated file fails here, naming the file, not later in a batch.
T = TypeVar("T")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Sample:
    """One image and its target; ``sample_id`` is stable across runs (it keys seeds and caches)."""

    sample_id: str
    image: torch.Tensor
    target: Any


class SampleDataset(Sequence[Sample]):
    """A random-access sequence of ``Sample`` s with the metadata the pipeline needs.

    Subclasses set ``name``, ``task``, ``num_classes``, ``class_names``, ``ignore_index``, ``split`` and implement
    ``__len__``, ``sample_id`` and ``_load``; ``_options`` and ``_data_digest`` feed ``fingerprint``: by default the
    output size ``_hw`` when a subclass sets it, and the digest ``_digest`` it computed of its files.
    """

    name: str = "dataset"
    task: str = "classification"
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    ignore_index: int | None = None
    split: str = ""
    split_note: str = ""  # provenance of the split when it matters for reading results (e.g. MNIST train digits)

    _fingerprint: str | None = None
    _hw: tuple[int, int] | None = None  # output (H, W) when the dataset resizes
    _digest: str = ""  # digest of the underlying files or arrays

    def __len__(self) -> int:
        raise NotImplementedError

    def sample_id(self, index: int) -> str:
        raise NotImplementedError

    def _load(self, index: int) -> Sample:
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        return {"size": list(self._hw)} if self._hw is not None else {}

    def _data_digest(self) -> str:
        return self._digest

    @property
    def sample_ids(self) -> list[str]:
        return [self.sample_id(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"{self.name}: index must be an int, got {type(index).__name__}")
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} samples")
        return self._load(i)

    def __iter__(self) -> Iterator[Sample]:  # Sequence's default probes until IndexError; this is direct
        for i in range(len(self)):
            yield self._load(i)

    def fingerprint(self) -> str:
        """Hex digest of name, split, options and a cheap digest of the underlying data (cache keys use it)."""
        if self._fingerprint is None:
            payload = {
                "name": self.name,
                "task": self.task,
                "split": self.split,
                "options": self._options(),
                "data": self._data_digest(),
            }
            blob = json.dumps(payload, sort_keys=True, default=str).encode()
            self._fingerprint = f"{self.name}-{hashlib.blake2b(blob, digest_size=10).hexdigest()}"
        return self._fingerprint

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, task={self.task!r})"


# --------------------------------------------------------------------------------------------------- helpers


def default_data_dir() -> Path:
    """The data cache: ``$EQUI_DATA_DIR`` or ``~/.cache/equirobust/data``."""
    env = os.environ.get("EQUI_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "equirobust" / "data"


def require_dir(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path, or a DatasetError naming it when it is not a directory."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DatasetError(f"{p}: {what} root does not exist (expected a directory)")
    return p


def check_layout(root: Path, folders: Sequence[str], what: str) -> None:
    """Fail with the list of expected folders when any of them is missing under ``root``."""
    missing = [f for f in folders if not (root / f).is_dir()]
    if missing:
        expected = ", ".join(f"{f}/" for f in folders)
        raise DatasetError(
            f"{root}: expected folders {expected} for {what} (missing: {', '.join(f'{m}/' for m in missing)})"
        )


def check_inside(path: Path, root: Path | None) -> Path:
    """``path`` unless it leaves the dataset ``root`` through ``..`` or a symlink: a file name taken from an
    annotation or index file, or a symlink in a downloaded dataset, must not make a loader read arbitrary files."""
    if root is None or outside_roots_allowed():
        return path
    try:
        real, real_root = path.resolve(), root.resolve()
    except (OSError, RuntimeError):  # a symlink loop: the read that follows reports the file
        return path
    if not real.is_relative_to(real_root):
        raise DatasetError(
            f"{path}: resolves to {real}, outside the dataset root {root} (through '..' or a symlink); refused "
            "(pass --allow-outside-roots to allow it)"
        )
    return path


def read_image(path: Path, mode: str = "RGB", root: Path | None = None) -> Image.Image:
    """Decode ``path`` fully and convert to ``mode``; DatasetError naming the file when it cannot be decoded or
    when it lies outside the dataset ``root`` (see :func:`check_inside`)."""
    return _decoded(path, root, "image", lambda img: img.convert(mode))


def read_label_raw(path: Path, root: Path | None = None) -> tuple[str, np.ndarray]:
    """(PIL mode, raw pixel array) of a label image; DatasetError naming the file when missing or undecodable (or
    outside the dataset ``root``)."""
    return _decoded(path, root, "label", lambda img: (img.mode, np.asarray(img)), "label image")


def _decoded(path: Path, root: Path | None, what: str, read: Callable[[Image.Image], T], decoded: str = "") -> T:
    """``read`` of the fully decoded image at ``path``, inside ``root``; DatasetError naming the file otherwise."""
    check_inside(path, root)
    if not path.is_file():
        raise DatasetError(f"{path}: {what} file not found")
    try:
        with Image.open(path) as img:
            img.load()
            return read(img)
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"{path}: cannot decode {decoded or what} ({type(exc).__name__}: {exc})") from None


def read_label_map(path: Path, root: Path | None = None) -> np.ndarray:
    """A label PNG as its raw integer values (palette indices for mode P), ``H x W`` int64."""
    return label_array(*read_label_raw(path, root), path)


def label_array(mode: str, arr: np.ndarray, path: Path) -> np.ndarray:
    """Integer class map from a decoded label image; only single-channel and palette modes carry class ids."""
    if mode not in ("P", "L", "I", "I;16", "I;16B", "1"):
        raise DatasetError(f"{path}: expected a single-channel or palette label PNG, got mode {mode}")
    return arr.astype(np.int64)


def check_label_values(label: np.ndarray, valid_max: int, path: Path, ignore: int | None = IGNORE_INDEX) -> None:
    """Every value is in ``0..valid_max`` (or ``ignore``); otherwise name the file and the first bad value."""
    values = np.unique(label)
    bad = values[(values < 0) | ((values > valid_max) & (values != (ignore if ignore is not None else -1)))]
    if bad.size:
        allowed = f"0..{valid_max}" + (f" or {ignore}" if ignore is not None else "")
        raise DatasetError(f"{path}: label value {int(bad[0])} out of range (expected {allowed})")


def check_same_size(image: Image.Image, label: np.ndarray, label_path: Path) -> None:
    """A label map must cover its image pixel for pixel (both are resized afterwards, which would hide it)."""
    if label.shape != (image.size[1], image.size[0]):
        raise DatasetError(
            f"{label_path}: label is {label.shape[1]}x{label.shape[0]}, its image is {image.size[0]}x{image.size[1]}"
        )


def as_hw(size: int | Sequence[int], what: str) -> tuple[int, int]:
    """``size`` as (height, width): an int means a square."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        vals = list(size)
        if len(vals) != 2:
            raise DatasetError(f"{what}: size must be an int or (height, width), got {size!r}")
        h, w = int(vals[0]), int(vals[1])
    if h <= 0 or w <= 0:
        raise DatasetError(f"{what}: size must be positive, got {size!r}")
    return h, w


def resize_image(img: Image.Image, hw: tuple[int, int]) -> Image.Image:
    """Bilinear resize to (height, width); PIL's bilinear antialiases when shrinking, like torchvision on PIL."""
    h, w = hw
    if img.size == (w, h):
        return img
    return img.resize((w, h), Image.Resampling.BILINEAR)


def resize_labels(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer map (values 0..255) so class ids and 255 survive unchanged."""
    h, w = hw
    if label.shape == (h, w):
        return label
    if label.min() < 0 or label.max() > 255:
        raise DatasetError(f"label map values must lie in 0..255 to resize, got {label.min()}..{label.max()}")
    img = Image.fromarray(label.astype(np.uint8), mode="L")
    return np.asarray(img.resize((w, h), Image.Resampling.NEAREST)).astype(label.dtype)


def image_to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 PIL image / ``H x W [x C]`` array -> float32 ``C x H x W`` in [0, 1]."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise DatasetError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)


def files_digest(paths: Iterable[Path], root: Path | None = None) -> str:
    """Cheap digest of file names and sizes (not contents): changes when files are added, removed or rewritten."""
    h = hashlib.blake2b(digest_size=12)
    for p in sorted(paths):
        rel = p.relative_to(root) if root is not None else Path(p.name)
        try:
            size = p.stat().st_size
        except OSError:
            size = -1
        h.update(f"{rel.as_posix()}\x1f{size}\x1e".encode())
    return h.hexdigest()


def array_digest(*arrays: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=12)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def select_indices(n: int, indices: Sequence[int] | None, limit: int | None, what: str) -> np.ndarray:
    """Subset of ``range(n)``: explicit ``indices`` (validated) then the first ``limit`` of them."""
    if indices is not None:
        idx = np.asarray(list(indices), dtype=np.int64)
        if idx.ndim != 1:
            raise DatasetError(f"{what}: indices must be a flat list of ints")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise DatasetError(f"{what}: index {bad} out of range for {n} samples")
    else:
        idx = np.arange(n, dtype=np.int64)
    if limit is not None:
        if int(limit) < 0:
            raise DatasetError(f"{what}: limit must be >= 0, got {limit}")
        idx = idx[: int(limit)]
    return idx


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """xyxy boxes ``[N, 4]`` enclosing each mask's pixels, in pixel-edge coordinates (x1 = last column + 1), the
    convention of COCO's ``toBbox``."""
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    for i, m in enumerate(masks):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if ys.numel():
            boxes[i] = torch.tensor(
                [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1], dtype=torch.float32
            )
    return boxes


# --------------------------------------------------------------------------------------------------- collate


def collate(samples: Sequence[Sample]) -> tuple[torch.Tensor, Any, list[str]]:
    """Batch samples: ``(images B x C x H x W, targets, sample_ids)``.

    Targets are a LongTensor ``[B]`` (classification), a LongTensor ``[B, H, W]`` (segmentation) or a list of
    instance dicts (instance segmentation, since the number of instances differs per image).
    """
    if len(samples) == 0:
        raise DatasetError("collate: got an empty list of samples")
    shapes = {tuple(s.image.shape) for s in samples}
    if len(shapes) != 1:
        raise DatasetError(f"collate: images of different sizes {sorted(shapes)}; resize them in the dataset")
    images = torch.stack([s.image for s in samples])
    ids = [s.sample_id for s in samples]
    first = samples[0].target
    if isinstance(first, dict):
        targets: Any = [s.target for s in samples]
    elif isinstance(first, torch.Tensor):
        targets = torch.stack([s.target for s in samples]).long()
    else:
        targets = torch.tensor([int(s.target) for s in samples], dtype=torch.long)
    return images, targets, ids


@contextlib.contextmanager
def atomic_directory(dest: Path) -> Iterator[Path]:
    """Fill a temporary sibling folder, then swap it in for ``dest``: a crash never leaves a half-written folder
    that a later run would take as complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
