"""The generic datasets for your own images (issue #17): ``image_folder`` (ImageFolder layout, or a CSV / JSON list
with class names) and ``segmentation_folder`` (images/ + masks/ paired by stem, palette or index PNGs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from equicore.errors import DatasetError
from equicore.registry import DATASETS


def _png(path: Path, hw: tuple[int, int] = (12, 16), value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*hw, 3), value, np.uint8)).save(path)


def _folder(root: Path) -> Path:
    for cls in ("zebra", "ant"):
        for i in range(2):
            _png(root / cls / f"{i}.png", value=40 * i + (0 if cls == "ant" else 120))
    return root


def test_image_folder_layout_sorted_classes_and_ids(tmp_path: Path) -> None:
    ds = DATASETS.build("image_folder", root=str(_folder(tmp_path / "f")))
    assert ds.class_names == ("ant", "zebra") and ds.num_classes == 2 and len(ds) == 4
    assert [ds[i].target for i in range(4)] == [0, 0, 1, 1]
    assert ds.sample_ids == ["ant/0", "ant/1", "zebra/0", "zebra/1"]
    s = ds[3]
    assert s.image.shape == (3, 12, 16) and s.image.dtype == torch.float32 and 0 <= s.image.min() <= s.image.max() <= 1
    ordered = DATASETS.build("image_folder", root=str(tmp_path / "f"), class_names=["zebra", "ant"])
    assert ordered.sample_ids[:2] == ["zebra/0", "zebra/1"]  # samples in class order, as torchvision's
    assert [ordered[i].target for i in range(4)] == [0, 0, 1, 1] and ordered.fingerprint() != ds.fingerprint()
    with pytest.raises(DatasetError, match=r"class folders \['ant', 'zebra'\] do not match class_names"):
        DATASETS.build("image_folder", root=str(tmp_path / "f"), class_names=["ant", "bee"])


def test_image_folder_list_files_csv_and_json(tmp_path: Path) -> None:
    root = _folder(tmp_path / "f")
    (root / "list.csv").write_text("path,label\nzebra/0.png,zebra\nant/1.png,0\n")
    ds = DATASETS.build("image_folder", root=str(root), list_file="list.csv", class_names=["ant", "zebra"])
    assert [s.target for s in ds] == [1, 0] and ds.sample_ids == ["zebra/0", "ant/1"]
    (root / "list.json").write_text(json.dumps([["ant/0.png", 1], {"path": "zebra/1.png", "label": "ant"}]))
    ds = DATASETS.build("image_folder", root=str(root), list_file="list.json", class_names=["ant", "zebra"])
    assert [s.target for s in ds] == [1, 0]
    (root / "bad.csv").write_text("ant/0.png,7\n")
    with pytest.raises(DatasetError, match=r"bad.csv: entry 1: label 7 out of range \(expected 0..1\)"):
        DATASETS.build("image_folder", root=str(root), list_file="bad.csv", class_names=["ant", "zebra"])
    (tmp_path / "outside.png").write_bytes((root / "ant" / "0.png").read_bytes())
    (root / "escape.csv").write_text("../outside.png,ant\n")
    with pytest.raises(DatasetError, match="outside the dataset root"):
        DATASETS.build("image_folder", root=str(root), list_file="escape.csv", class_names=["ant", "zebra"])
    with pytest.raises(DatasetError, match="a list_file needs class_names"):
        DATASETS.build("image_folder", root=str(root), list_file="list.csv")


def test_image_folder_sizes_resize_and_crop(tmp_path: Path) -> None:
    root = _folder(tmp_path / "f")
    _png(root / "zebra" / "2.png", hw=(20, 10))
    ds = DATASETS.build("image_folder", root=str(root))
    with pytest.raises(DatasetError, match=r"zebra/2.png: image is 10x20 but the dataset's images are 16x12"):
        ds[4]
    fixed = DATASETS.build("image_folder", root=str(root), size=[8, 8])
    assert {tuple(s.image.shape) for s in fixed} == {(3, 8, 8)}
    cropped = DATASETS.build("image_folder", root=str(root), resize=10, crop=8, mode="L")
    assert {tuple(s.image.shape) for s in cropped} == {(1, 8, 8)}
    assert len({fixed.fingerprint(), cropped.fingerprint(), ds.fingerprint()}) == 3
    with pytest.raises(DatasetError, match="size conflicts with resize/crop"):
        DATASETS.build("image_folder", root=str(root), size=8, crop=4)


def _seg(root: Path, n: int = 3, palette: bool = True) -> Path:
    for i in range(n):
        _png(root / "images" / f"{i:02d}.jpg" if i else root / "images" / f"{i:02d}.png", hw=(8, 10))
        mask = np.zeros((8, 10), np.uint8)
        mask[:4, :5] = 1 + i % 2
        mask[-1, -1] = 255
        img = Image.fromarray(mask, mode="P" if palette else "L")
        if palette:
            img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0, 0, 0] * 253)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        img.save(root / "masks" / f"{i:02d}.png")
    return root


def test_segmentation_folder_palette_masks_ignore_and_resize(tmp_path: Path) -> None:
    root = _seg(tmp_path / "s")
    ds = DATASETS.build("segmentation_folder", root=str(root), class_names=["bg", "red", "green"])
    assert (ds.task, ds.num_classes, ds.ignore_index, len(ds)) == ("segmentation", 3, 255, 3)
    s = ds[1]
    assert s.sample_id == "01" and s.image.shape == (3, 8, 10) and s.target.dtype == torch.int64
    assert set(torch.unique(s.target).tolist()) == {0, 2, 255}
    big = DATASETS.build("segmentation_folder", root=str(root), num_classes=3, size=[16, 20])
    t = big[1].target
    assert t.shape == (16, 20) and set(torch.unique(t).tolist()) == {0, 2, 255}  # nearest: no invented classes
    index = DATASETS.build("segmentation_folder", root=str(_seg(tmp_path / "i", palette=False)), num_classes=3)
    assert torch.equal(index[1].target, s.target)
    before = ds.fingerprint()
    _seg(tmp_path / "s", n=4)
    after = DATASETS.build("segmentation_folder", root=str(root), class_names=["bg", "red", "green"])
    assert after.fingerprint() != before and len(after) == 4


def test_segmentation_folder_errors(tmp_path: Path) -> None:
    root = _seg(tmp_path / "s")
    with pytest.raises(DatasetError, match="give class_names or num_classes"):
        DATASETS.build("segmentation_folder", root=str(root))
    small = DATASETS.build("segmentation_folder", root=str(root), num_classes=2)
    with pytest.raises(DatasetError, match=r"masks/01.png: label value 2 out of range \(expected 0..1 or 255\)"):
        small[1]
    (root / "masks" / "07.png").write_bytes((root / "masks" / "00.png").read_bytes())
    with pytest.raises(DatasetError, match=r"masks/07.png: no image 07.\* in .*images for this mask"):
        DATASETS.build("segmentation_folder", root=str(root), num_classes=3)
    (root / "masks" / "07.png").unlink()
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(root / "masks" / "00.png")
    with pytest.raises(DatasetError, match="expected a single-channel or palette label PNG, got mode RGB"):
        DATASETS.build("segmentation_folder", root=str(root), num_classes=3)[0]
    with pytest.raises(DatasetError, match=r"ignore_index 1 must lie in 3..255"):
        DATASETS.build("segmentation_folder", root=str(root), num_classes=3, ignore_index=1)
    (tmp_path / "e" / "images").mkdir(parents=True)
    (tmp_path / "e" / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"e/images: no images"):
        DATASETS.build("segmentation_folder", root=str(tmp_path / "e"), num_classes=3)
