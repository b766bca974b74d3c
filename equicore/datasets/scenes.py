"""Fashion scenes: the project's offline segmentation benchmark, composed from real images with exact labels.

A scene is a random crop of a real photo (scikit-image's bundled pictures) with 2-4 real Fashion-MNIST items pasted
on it at random scales and positions. Each item is tinted with a random colour and composited through its own mask
(resized item intensity > ``threshold``); later items occlude earlier ones. The labels are exact by construction:

- semantic (``fashion_scenes``): 0 = background, 1..10 = Fashion-MNIST category + 1, on every visible item pixel;
- instance (``fashion_scenes_instances``): one instance per item with its *visible* mask, dropped when fewer than
  ``min_area`` pixels stay visible; labels 1..10; boxes from the masks.

Train and test never share sources: train scenes use Fashion-MNIST's train split and the photos in
``BACKGROUNDS["train"]``; test scenes use Fashion-MNIST's test split and the other photos, ``BACKGROUNDS["test"]``.
The validation split ``val`` (for ``equi tune``; 200 scenes by default) is built from the TRAIN-side sources only
(Fashion-MNIST train items on the train photos), never the test ones, with its own scene generators (split "val" in
the seed): new compositions the shipped models never saw as scenes, of items and photos they did see in training.

Scene ``i`` of a split is drawn from its own generator seeded by ``derive_seed(seed, "fashion_scenes", split, i)``,
so it is the same whichever other scenes are generated. Scenes are generated lazily, or read from a cache of
``.npy`` files that ``prepare()`` (``scripts/prepare_data.py``) writes under ``<data dir>/fashion_scenes/``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from equicore.datasets.base import (
    IGNORE_INDEX,
    Sample,
    SampleDataset,
    as_hw,
    atomic_directory,
    default_data_dir,
    files_digest,
    masks_to_boxes,
    read_image,
)
from equicore.datasets.fashion_mnist import FASHION_CLASSES, idx_files, load_fashion_mnist
from equicore.datasets.mnist import package_data_dir
from equicore.errors import DatasetError
from equicore.registry import DATASETS
from equicore.seeding import derive_seed

# Where this dataset's loading code lives besides this module (for its code identity).
_MODULES = ("equicore.datasets.base", "equicore.datasets.fashion_mnist", "equicore.seeding")

# Bump when the composition changes: it is part of the fingerprint and of the cache key.
SCENE_VERSION = 1
SCENE_CLASSES = ("background", *FASHION_CLASSES)
# Disjoint photo sets, so test backgrounds are unseen in training. All ship in the scikit-image wheel
# (skimage/data/); grey ones are replicated to RGB.
BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "train": ("astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "grass.png", "brick.png"),
    "test": ("chelsea.png", "ihc.png", "gravel.png", "camera.png"),
}
# The Fashion-MNIST split and photo set each scene split draws from (val: the train side, see the module docstring).
SOURCE_SPLIT = {"train": "train", "test": "test", "val": "train"}
DEFAULT_NUM_SCENES = {"train": 4000, "test": 500, "val": 200}
VAL_NOTE = (
    "validation scenes from TRAIN-side sources (Fashion-MNIST train items on the train photos, seen by the shipped "
    "models in training; new compositions): for tuning, not a test figure"
)
SKIMAGE_VERSION = "0.26.0"
_CACHE_FILES = ("images.npy", "instances.npy", "labels.npy", "keep.npy", "sources.npy")


@dataclass(frozen=True)
class SceneConfig:
    """Everything that determines the scenes of one split (it keys the cache)."""

    split: str
    seed: int
    num_scenes: int
    height: int
    width: int
    min_items: int
    max_items: int
    min_item_size: int
    max_item_size: int
    threshold: float
    min_area: int

    def key(self, sources: str) -> str:
        blob = json.dumps({**asdict(self), "version": SCENE_VERSION, "sources": sources}, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def background_dir(data_dir: Path | None = None) -> Path:
    """Folder holding the background photos: ``<data_dir>/backgrounds``, the default data dir's, or an installed
    scikit-image's data folder (the same files)."""
    names = [n for split in BACKGROUNDS.values() for n in split]
    cands = [(data_dir or default_data_dir()) / "backgrounds", default_data_dir() / "backgrounds"]
    pkg = package_data_dir("skimage", "data")
    if pkg is not None:
        cands.append(pkg)
    for cand in cands:
        if all((cand / n).is_file() for n in names):
            return cand
    raise DatasetError(
        f"{cands[0]}: background photos {', '.join(names)} not found (nor in an installed scikit-image); "
        f"run `python scripts/prepare_data.py` or `pip install scikit-image=={SKIMAGE_VERSION}`"
    )


@functools.lru_cache(maxsize=4)
def _load_photos(folder: str, names: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """uint8 ``H x W x 3`` arrays (grey photos replicated), decoded once per process."""
    return tuple(np.asarray(read_image(Path(folder) / n, "RGB")) for n in names)


def compose_scene(
    cfg: SceneConfig,
    index: int,
    pool_images: np.ndarray,
    pool_labels: np.ndarray,
    photos: Sequence[np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scene ``index``: (image ``H x W x 3`` uint8, instance map ``H x W`` uint8 with 0 = background and k = the
    k-th pasted item, labels ``[K]`` (class + 1), keep ``[K]`` (visible area >= min_area), sources ``[K]`` (item
    index in the Fashion-MNIST split))."""
    rng = np.random.default_rng(derive_seed(cfg.seed, "fashion_scenes", cfg.split, index))
    h, w = cfg.height, cfg.width

    # Background: a random crop with the scene's aspect ratio, 30-100% of the photo's short side, maybe mirrored.
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    frac = rng.uniform(0.3, 1.0)
    ch = max(8, int(round(frac * min(ph, pw * h / w))))
    cw = max(8, min(pw, int(round(ch * w / h))))
    y0 = int(rng.integers(0, ph - ch + 1))
    x0 = int(rng.integers(0, pw - cw + 1))
    bg = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw]).resize((w, h), Image.Resampling.BILINEAR)
    canvas = np.asarray(bg, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
    canvas = np.ascontiguousarray(canvas)

    n_items = int(rng.integers(cfg.min_items, cfg.max_items + 1))
    inst = np.zeros((h, w), dtype=np.uint8)
    labels = np.zeros(n_items, dtype=np.uint8)
    sources = np.zeros(n_items, dtype=np.int64)
    for k in range(n_items):
        j = int(rng.integers(len(pool_labels)))
        s = int(rng.integers(cfg.min_item_size, cfg.max_item_size + 1))
        y = int(rng.integers(0, h - s + 1))
        x = int(rng.integers(0, w - s + 1))
        tint = rng.uniform(0.2, 1.0, size=3).astype(np.float32)
        item = Image.fromarray(pool_images[j]).resize((s, s), Image.Resampling.BILINEAR)
        v = np.asarray(item, dtype=np.float32) / 255.0
        mask = v > cfg.threshold
        # Keep the garment's own shading under the tint so texture, not just a flat blob, marks the class.
        colour = tint[None, None, :] * (0.25 + 0.75 * v[:, :, None])
        region = canvas[y : y + s, x : x + s]
        region[mask] = colour[mask]
        inst[y : y + s, x : x + s][mask] = k + 1
        labels[k] = int(pool_labels[j]) + 1
        sources[k] = j
    areas = np.bincount(inst.ravel(), minlength=n_items + 1)[1:]
    keep = areas >= cfg.min_area
    image = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    return image, inst, labels, keep, sources


def instance_target(inst: np.ndarray, labels: np.ndarray, keep: np.ndarray, image_id: int) -> dict[str, Any]:
    """Instance dict from an instance map: one mask per kept item, in paint order."""
    kept = [k for k in range(len(labels)) if keep[k] and labels[k] > 0]
    h, w = inst.shape
    if kept:
        inst_t = torch.from_numpy(np.asarray(inst, dtype=np.int64))
        masks = torch.stack([(inst_t == k + 1) for k in kept]).to(torch.uint8)
    else:
        masks = torch.zeros((0, h, w), dtype=torch.uint8)
    return {
        "boxes": masks_to_boxes(masks),
        "labels": torch.tensor([int(labels[k]) for k in kept], dtype=torch.long),
        "masks": masks,
        "image_id": int(image_id),
    }


class FashionScenes(SampleDataset):
    """Scenes of one split; ``task`` "segmentation" or "instance" picks the target form."""

    class_names = SCENE_CLASSES
    # Instance datasets count the background too (torchvision Mask R-CNN convention): labels are 1..num_classes-1.
    num_classes = len(SCENE_CLASSES)

    def __init__(self, cfg: SceneConfig, task: str, data_dir: Path, fashion_root: str | None, cache: bool) -> None:
        self._args = (cfg, task, data_dir, fashion_root, cache)
        self.cfg = cfg
        self.task = task
        self.name = "fashion_scenes" if task == "segmentation" else "fashion_scenes_instances"
        self.split = cfg.split
        self.ignore_index = IGNORE_INDEX if task == "segmentation" else None
        self.source_split = SOURCE_SPLIT[cfg.split]
        if cfg.split == "val":
            self.split_note = VAL_NOTE
        self._pool_images, self._pool_labels, fm_root = load_fashion_mnist(fashion_root, self.source_split)
        self._bg_dir = background_dir(data_dir)
        self._photos = _load_photos(str(self._bg_dir), BACKGROUNDS[self.source_split])
        self._sources = (
            files_digest(idx_files(fm_root, self.source_split))
            + ":"
            + files_digest([self._bg_dir / n for n in BACKGROUNDS[self.source_split]])
        )
        self._cache: dict[str, np.ndarray] | None = None
        if cache:
            self._cache = load_scene_cache(cache_path(cfg, data_dir, self._sources), cfg)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle the recipe, not the arrays: workers reopen the (memory-mapped) cache and the per-process pools.
        return (type(self), self._args)

    def __len__(self) -> int:
        return self.cfg.num_scenes

    def sample_id(self, index: int) -> str:
        return f"{self.split}/{index:06d}"

    def scene_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(image, instance map, labels, keep, sources) of scene ``index`` (from the cache when there is one)."""
        if self._cache is not None:
            c = self._cache
            n = int((c["labels"][index] > 0).sum())
            return (
                np.asarray(c["images"][index]),
                np.asarray(c["instances"][index]),
                np.asarray(c["labels"][index][:n]),
                np.asarray(c["keep"][index][:n]),
                np.asarray(c["sources"][index][:n]),
            )
        return compose_scene(self.cfg, index, self._pool_images, self._pool_labels, self._photos)

    def scene_items(self, index: int) -> list[tuple[str, int, int]]:
        """(Fashion-MNIST split, item index, class 0..9) of every item pasted into scene ``index``."""
        _, _, labels, _, sources = self.scene_arrays(index)
        return [(self.source_split, int(s), int(lab) - 1) for lab, s in zip(labels, sources, strict=True)]

    def _load(self, index: int) -> Sample:
        image, inst, labels, keep, _ = self.scene_arrays(index)
        img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        if self.task == "segmentation":
            lut = np.concatenate([[0], labels]).astype(np.int64)
            target: Any = torch.from_numpy(lut[inst.astype(np.int64)])
        else:
            target = instance_target(inst, labels, keep, index)
        return Sample(self.sample_id(index), img, target)

    def _options(self) -> dict[str, Any]:
        return {**asdict(self.cfg), "version": SCENE_VERSION}

    def _data_digest(self) -> str:
        return self._sources


# ------------------------------------------------------------------------------------------------------ cache


def cache_path(cfg: SceneConfig, data_dir: Path, sources: str) -> Path:
    return data_dir / "fashion_scenes" / f"{cfg.split}-{cfg.key(sources)}"


def load_scene_cache(path: Path, cfg: SceneConfig) -> dict[str, np.ndarray] | None:
    """Memory-mapped arrays of a complete cache at ``path``, or None (then scenes are generated lazily)."""
    if not all((path / f).is_file() for f in _CACHE_FILES):
        return None
    arrays = {f[:-4]: np.load(path / f, mmap_mode="r") for f in _CACHE_FILES}
    if arrays["images"].shape != (cfg.num_scenes, cfg.height, cfg.width, 3):
        raise DatasetError(
            f"{path}: scene cache holds images {arrays['images'].shape}, expected "
            f"{(cfg.num_scenes, cfg.height, cfg.width, 3)}; delete the folder to rebuild it"
        )
    return arrays


def build_scene_cache(ds: FashionScenes, data_dir: Path, log: Callable[[str], None] | None = None) -> Path:
    """Generate every scene of ``ds`` and write the cache (atomically: a temp folder renamed into place), unless a
    valid cache is already there."""
    cfg = ds.cfg
    path = cache_path(cfg, data_dir, ds._sources)
    if load_scene_cache(path, cfg) is not None:
        return path
    if log is not None:
        log(f"building the fashion_scenes {cfg.split} cache ({len(ds)} scenes)")
    n, m = cfg.num_scenes, cfg.max_items
    images = np.zeros((n, cfg.height, cfg.width, 3), dtype=np.uint8)
    instances = np.zeros((n, cfg.height, cfg.width), dtype=np.uint8)
    labels = np.zeros((n, m), dtype=np.uint8)
    keep = np.zeros((n, m), dtype=bool)
    sources = np.full((n, m), -1, dtype=np.int64)
    for i in range(n):
        img, inst, lab, kp, src = compose_scene(cfg, i, ds._pool_images, ds._pool_labels, ds._photos)
        images[i], instances[i] = img, inst
        labels[i, : len(lab)], keep[i, : len(lab)], sources[i, : len(lab)] = lab, kp, src
    with atomic_directory(path) as tmp:
        for name, arr in zip(_CACHE_FILES, (images, instances, labels, keep, sources), strict=True):
            np.save(tmp / name, arr)
        (tmp / "config.json").write_text(json.dumps({**asdict(cfg), "version": SCENE_VERSION}, indent=1))
    return path


# -------------------------------------------------------------------------------------------------- factories


def scene_config(
    split: str,
    seed: int,
    num_scenes: int | None,
    size: int | Sequence[int],
    items: Sequence[int],
    item_size: Sequence[int] | None,
    threshold: float,
    min_area: int,
) -> SceneConfig:
    """Validate the options into a SceneConfig (item sizes default to 20-44 px at 96 px, scaled with the scene)."""
    if split not in SOURCE_SPLIT:
        raise DatasetError(f"fashion_scenes: unknown split {split!r} (expected 'train', 'test' or 'val')")
    h, w = as_hw(size, "fashion_scenes")
    n = DEFAULT_NUM_SCENES[split] if num_scenes is None else int(num_scenes)
    lo, hi = (int(v) for v in items)
    if n < 0 or not 1 <= lo <= hi <= 254:
        raise DatasetError(
            f"fashion_scenes: need num_scenes >= 0 and 1 <= items[0] <= items[1] <= 254, got {n}, {items}"
        )
    if item_size is None:
        short = min(h, w)
        item_size = (max(4, round(20 * short / 96)), max(4, round(44 * short / 96)))
    smin, smax = (int(v) for v in item_size)
    if not 1 <= smin <= smax <= min(h, w):
        raise DatasetError(f"fashion_scenes: item_size {tuple(item_size)} must satisfy 1 <= min <= max <= {min(h, w)}")
    return SceneConfig(split, int(seed), n, h, w, lo, hi, smin, smax, float(threshold), int(min_area))


def _build(task: str, **kw: Any) -> FashionScenes:
    root = kw.pop("root")
    fashion_root = kw.pop("fashion_root")
    cache = kw.pop("cache")
    data_dir = Path(root).expanduser() if root is not None else default_data_dir()
    return FashionScenes(scene_config(**kw), task, data_dir, fashion_root, cache)


@DATASETS.register("fashion_scenes", task="segmentation", modules=_MODULES, test_split="test", validation_split="val")
def fashion_scenes(
    root: str | None = None,
    split: str = "train",
    seed: int = 0,
    num_scenes: int | None = None,
    size: int | Sequence[int] = 96,
    items: Sequence[int] = (2, 4),
    item_size: Sequence[int] | None = None,
    threshold: float = 0.15,
    min_area: int = 8,
    fashion_root: str | None = None,
    cache: bool = True,
) -> FashionScenes:
    """Semantic segmentation scenes, 3 x 96 x 96, 11 classes (0 = background), ignore_index 255 (unused here).

    ``root`` is the data cache (backgrounds/ and fashion_scenes/ caches; default ``$EQUI_DATA_DIR``);
    ``split`` "train", "test" or "val" (train-side sources, for ``equi tune``);
    ``num_scenes`` defaults to 4000 (train) / 500 (test) / 200 (val); ``items`` = (min, max) items per scene;
    ``item_size`` = (min, max) item side in pixels; ``fashion_root`` overrides the Fashion-MNIST folder.
    """
    return _build(
        "segmentation",
        root=root,
        split=split,
        seed=seed,
        num_scenes=num_scenes,
        size=size,
        items=items,
        item_size=item_size,
        threshold=threshold,
        min_area=min_area,
        fashion_root=fashion_root,
        cache=cache,
    )


@DATASETS.register(
    "fashion_scenes_instances", task="instance", modules=_MODULES, test_split="test", validation_split="val"
)
def fashion_scenes_instances(
    root: str | None = None,
    split: str = "train",
    seed: int = 0,
    num_scenes: int | None = None,
    size: int | Sequence[int] = 96,
    items: Sequence[int] = (2, 4),
    item_size: Sequence[int] | None = None,
    threshold: float = 0.15,
    min_area: int = 8,
    fashion_root: str | None = None,
    cache: bool = True,
) -> FashionScenes:
    """The same scenes as ``fashion_scenes`` with instance targets (one per item with >= ``min_area`` visible px)."""
    return _build(
        "instance",
        root=root,
        split=split,
        seed=seed,
        num_scenes=num_scenes,
        size=size,
        items=items,
        item_size=item_size,
        threshold=threshold,
        min_area=min_area,
        fashion_root=fashion_root,
        cache=cache,
    )
