"""Paper-format loaders (ImageNet, Cityscapes, PASCAL VOC, COCO) on real files in those layouts (tests/fixtures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import equicore.datasets as D
from equicore.datasets.base import resize_labels
from equicore.datasets.cityscapes import label_ids_to_train_ids
from equicore.datasets.imagenet import deterministic_subset
from equicore.errors import DatasetError
from equicore.registry import DATASETS

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
VOC = FIXTURES / "voc" / "VOC2012"
CITY = FIXTURES / "cityscapes"
COCO = FIXTURES / "coco"
INET = FIXTURES / "imagenet"
# pycocotools' decoder (used by the reference annToMask) trips a numpy 2 deprecation warning that is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
GARBAGE = b"\x00\x01 these bytes are no image \xff" * 8


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _check_image(img: torch.Tensor, hw: tuple[int, int]) -> None:
    assert img.shape == (3, *hw) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.std()) > 0.05


# ------------------------------------------------------------------------------------------------ ImageNet


def test_imagenet_folder_sorted_wnids_and_class_index() -> None:
    ds = DATASETS.build("imagenet", root=str(INET), fraction=1.0)
    assert len(ds) == 6 and ds.num_classes == 5 and ds.task == "classification"
    assert [s.target for s in ds] == [0, 1, 2, 3, 3, 4]  # sorted wnid order
    _check_image(ds[0].image, (224, 224))
    assert ds.sample_id(0) == "val/n00000022/imagenet_17_22"
    mapped = DATASETS.build("imagenet", root=str(INET), fraction=1.0, class_index=str(INET / "class_index.json"))
    # foolbox names carry the true ImageNet label: imagenet_17_22.JPEG is class 22.
    assert [s.target for s in mapped] == [int(sid.rsplit("_", 1)[1]) for sid in mapped.sample_ids]
    assert mapped.fingerprint() != ds.fingerprint()


def test_imagenet_fraction_is_a_deterministic_subset() -> None:
    assert deterministic_subset(50000, 0.05).tolist()[:3] == [0, 20, 40]
    assert len(deterministic_subset(50000, 0.05)) == 2500
    half = DATASETS.build("imagenet", root=str(INET), fraction=0.5)
    full = DATASETS.build("imagenet", root=str(INET), fraction=1.0)
    assert half.sample_ids == full.sample_ids[::2]
    assert len(DATASETS.build("imagenet", root=str(INET))) == 1  # default 5% of 6 files


def test_imagenet_keras_style_class_index(tmp_path: Path) -> None:
    keras = {str(i): [f"n{i:08d}", f"class {i}"] for i in (22, 129, 438, 609, 630)}
    (tmp_path / "idx.json").write_text(json.dumps(keras))
    ds = DATASETS.build("imagenet", root=str(INET), fraction=1.0, class_index=str(tmp_path / "idx.json"))
    assert ds[0].target == 22


def test_imagenet_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        DATASETS.build("imagenet", root=str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="expected folder train/"):
        DATASETS.build("imagenet", root=str(INET), split="train")
    root = _copy(INET, tmp_path)
    bad = root / "val" / "n00000022" / "imagenet_17_22.JPEG"
    bad.write_bytes(GARBAGE)
    ds = DATASETS.build("imagenet", root=str(root), fraction=1.0)
    with pytest.raises(DatasetError, match=r"imagenet_17_22\.JPEG: cannot decode image"):
        ds[0]
    (root / "idx.json").write_text(json.dumps({"n00000022": 0}))
    with pytest.raises(DatasetError, match="no class index for folder 'n00000129'"):
        DATASETS.build("imagenet", root=str(root), class_index=str(root / "idx.json"))


# ---------------------------------------------------------------------------------------------- Cityscapes


def test_cityscapes_label_id_to_train_id_table() -> None:
    expected = [255] * 7 + [0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    expected += [255, 255, 16, 17, 18]
    assert label_ids_to_train_ids(np.arange(34)).tolist() == expected


def test_cityscapes_loader_maps_and_resizes() -> None:
    ds = DATASETS.build("cityscapes", root=str(CITY), split="val")
    assert len(ds) == 2 and ds.num_classes == 19 and ds.ignore_index == 255 and ds.class_names[13] == "car"
    s = ds[0]
    _check_image(s.image, (340, 680))
    assert s.target.shape == (340, 680) and s.target.dtype == torch.long
    raw = np.asarray(Image.open(CITY / "gtFine/val/labelme/labelme_000000_000100_gtFine_labelIds.png"))
    assert set(np.unique(raw).tolist()) == {0, 26, 27}  # unlabeled, car, truck
    # labelId 0 -> 255, 26 (car) -> 13, 27 (truck) -> 14, resized by nearest neighbour.
    lut = np.full(256, -1)
    lut[[0, 26, 27]] = [255, 13, 14]
    assert np.array_equal(s.target.numpy(), resize_labels(lut[raw], (340, 680)))
    assert set(torch.unique(s.target).tolist()) == {13, 14, 255}
    assert s.sample_id == "val/labelme/labelme_000000_000100"
    x, y, _ = D.collate(list(ds))
    assert x.shape == (2, 3, 340, 680) and y.shape == (2, 340, 680)


def test_cityscapes_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        DATASETS.build("cityscapes", root=str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match=r"expected folders leftImg8bit/train/, gtFine/train/"):
        DATASETS.build("cityscapes", root=str(CITY), split="train")
    root = _copy(CITY, tmp_path)
    lab = root / "gtFine/val/labelme/labelme_000000_000104_gtFine_labelIds.png"
    arr = np.asarray(Image.open(lab)).copy()
    arr[0, 0] = 40
    Image.fromarray(arr).save(lab)
    ds = DATASETS.build("cityscapes", root=str(root))
    with pytest.raises(DatasetError, match=r"000104_gtFine_labelIds\.png: label value 40 out of range"):
        ds[1]
    img = root / "leftImg8bit/val/labelme/labelme_000000_000100_leftImg8bit.png"
    img.write_bytes(GARBAGE)
    with pytest.raises(DatasetError, match=r"000100_leftImg8bit\.png: cannot decode image"):
        ds[0]
    lab.unlink()
    with pytest.raises(DatasetError, match="label file missing"):
        DATASETS.build("cityscapes", root=str(root))


# ---------------------------------------------------------------------------------------------------- VOC


def test_voc_loader_keeps_classes_and_ignore_through_resize() -> None:
    ds = DATASETS.build("voc", root=str(VOC), split="val")
    assert len(ds) == 3 and ds.num_classes == 21 and ds.ignore_index == 255 and ds.class_names[15] == "person"
    s = ds[0]
    assert s.sample_id == "val/2011_000003"
    _check_image(s.image, (480, 480))
    raw = np.asarray(Image.open(VOC / "SegmentationClass/2011_000003.png"))
    assert set(np.unique(raw).tolist()) == {0, 5, 15, 255}
    got = s.target.numpy()
    assert s.target.dtype == torch.long and set(np.unique(got).tolist()) == {0, 5, 15, 255}
    assert np.array_equal(got, resize_labels(raw.astype(np.int64), (480, 480)))
    # Nearest-neighbour resizing keeps the share of boundary (255) pixels about the same.
    assert abs((got == 255).mean() - (raw == 255).mean()) < 0.2 * (raw == 255).mean()
    for sample in ds:
        assert int(sample.target.max()) <= 255 and set(torch.unique(sample.target).tolist()) <= {*range(21), 255}


def test_voc_rgb_coded_labels_map_back_to_indices(tmp_path: Path) -> None:
    root = _copy(VOC, tmp_path)
    lab = root / "SegmentationClass/2011_000006.png"
    Image.open(lab).convert("RGB").save(lab)
    a = DATASETS.build("voc", root=str(root))[1].target
    b = DATASETS.build("voc", root=str(VOC))[1].target
    assert torch.equal(a, b)


def test_voc_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        DATASETS.build("voc", root=str(tmp_path / "nope"))
    root = _copy(VOC, tmp_path)
    with pytest.raises(DatasetError, match="train.txt: split list not found"):
        DATASETS.build("voc", root=str(root), split="train")
    (root / "JPEGImages/2011_000003.jpg").write_bytes(GARBAGE)
    lab = root / "SegmentationClass/2011_000025.png"
    pal = Image.open(lab)
    arr = np.asarray(pal).copy()
    arr[5, 5] = 30
    bad = Image.fromarray(arr, mode="P")
    bad.putpalette(pal.getpalette())
    bad.save(lab)
    ds = DATASETS.build("voc", root=str(root))
    with pytest.raises(DatasetError, match=r"2011_000003\.jpg: cannot decode image"):
        ds[0]
    with pytest.raises(DatasetError, match=r"2011_000025\.png: label value 30 out of range"):
        ds[2]
    small = root / "SegmentationClass/2011_000006.png"
    Image.open(small).resize((100, 75), Image.Resampling.NEAREST).save(small)
    with pytest.raises(DatasetError, match=r"2011_000006\.png: label is 100x75, its image is 500x375"):
        ds[1]
    shutil.rmtree(root / "SegmentationClass")
    with pytest.raises(
        DatasetError, match=r"VOC2012: expected folders JPEGImages/, SegmentationClass/, ImageSets/Segmentation/"
    ):
        DATASETS.build("voc", root=str(root))


# --------------------------------------------------------------------------------------------------- COCO


def _coco_api(path: Path):
    from pycocotools.coco import COCO

    return COCO(str(path))


def test_coco_instances_match_pycocotools_ann_to_mask() -> None:
    ds = DATASETS.build("coco_instances", root=str(COCO), split="val")
    api = _coco_api(COCO / "annotations/instances_val.json")
    assert ds.task == "instance" and ds.class_names[0] == "background" and "_background_" not in ds.class_names
    assert len(ds) == 3 and ds.num_classes == 21  # 20 VOC categories + background
    n_total = 0
    for s in ds:
        t = s.target
        _check_image(s.image, (400, 400))
        anns = api.loadAnns(api.getAnnIds(imgIds=[t["image_id"]]))
        assert len(t["labels"]) == len(anns)
        for k, ann in enumerate(anns):
            ref = resize_labels(api.annToMask(ann).astype(np.int64), (400, 400))
            got = t["masks"][k].numpy().astype(bool)
            iou = (got & (ref > 0)).sum() / (got | (ref > 0)).sum()
            assert iou > 0.999
            assert int(t["labels"][k]) == ds.class_names.index(api.loadCats(ann["category_id"])[0]["name"])
            ys, xs = np.nonzero(got)
            assert t["boxes"][k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            # The box in pixels agrees with COCO's own bbox scaled to 400 x 400 (within resampling error).
            info = api.loadImgs(ann["image_id"])[0]
            x, y, w, h = ann["bbox"]
            sx, sy = 400 / info["width"], 400 / info["height"]
            assert np.allclose(t["boxes"][k].numpy(), [x * sx, y * sy, (x + w) * sx, (y + h) * sy], atol=4)
        n_total += len(anns)
    assert n_total == 12
    _, targets, _ = D.collate(list(ds))
    assert isinstance(targets, list) and targets[2]["masks"].dtype == torch.uint8


def test_coco_semantic_masks_and_category_subset() -> None:
    ds = DATASETS.build("coco", root=str(COCO), split="val")
    api = _coco_api(COCO / "annotations/instances_val.json")
    s = ds[0]
    assert ds.ignore_index == 255 and s.target.shape == (400, 400) and s.target.dtype == torch.long
    expected = np.zeros((338, 500), dtype=np.int64)
    for ann in api.loadAnns(api.getAnnIds(imgIds=[0])):  # later annotations overwrite earlier ones
        expected[api.annToMask(ann) > 0] = ds.class_names.index(api.loadCats(ann["category_id"])[0]["name"])
    assert np.array_equal(s.target.numpy(), resize_labels(expected, (400, 400)))
    sub = DATASETS.build("coco", root=str(COCO), split="val", categories=["person", "bottle"])
    assert sub.class_names == ("background", "person", "bottle") and sub.num_classes == 3
    t = sub[0].target
    assert set(torch.unique(t).tolist()) == {0, 1, 2}
    assert torch.equal(t == 1, s.target == ds.class_names.index("person"))
    assert sub.fingerprint() != ds.fingerprint()
    with pytest.raises(DatasetError, match="unknown categor"):
        DATASETS.build("coco", root=str(COCO), split="val", categories=["unicorn"])


def test_coco_rle_and_crowd_annotations(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    root = _copy(COCO, tmp_path)
    ann_file = root / "annotations/instances_val.json"
    data = json.loads(ann_file.read_text())
    by_img = {im["id"]: im for im in data["images"]}
    first, second = data["annotations"][0], data["annotations"][1]
    h, w = by_img[first["image_id"]]["height"], by_img[first["image_id"]]["width"]
    # Compressed RLE (counts as a string) and uncompressed RLE (counts as a list) of the same polygons.
    rle = mask_utils.merge(mask_utils.frPyObjects(first["segmentation"], h, w))
    first["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    m2 = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(second["segmentation"], h, w)))
    flat = m2.ravel(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]]).astype(np.int8)) != 0)
    counts = np.diff(np.concatenate([[0], change])).tolist()
    second["segmentation"] = {"size": [h, w], "counts": counts}
    second["iscrowd"] = 1
    ann_file.write_text(json.dumps(data))
    new = DATASETS.build("coco_instances", root=str(root), split="val")
    old = DATASETS.build("coco_instances", root=str(COCO), split="val")
    assert torch.equal(new[0].target["masks"][0], old[0].target["masks"][0])  # RLE == polygon
    assert len(new[0].target["labels"]) == 2  # the crowd annotation is skipped
    crowd = DATASETS.build("coco_instances", root=str(root), split="val", include_crowd=True)[0].target
    assert torch.equal(crowd["masks"][1], old[0].target["masks"][1])  # uncompressed RLE == polygon
    sem = DATASETS.build("coco", root=str(root), split="val")[0].target
    crowd_px = old[0].target["masks"][1].bool() & ~old[0].target["masks"][0].bool()
    crowd_px &= ~old[0].target["masks"][2].bool()
    assert bool((sem[crowd_px] == 255).all())  # crowd regions are ignored where nothing else is painted


def test_coco_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        DATASETS.build("coco", root=str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match=r"expected annotations/instances_val2017\.json and val2017/"):
        DATASETS.build("coco", root=str(COCO))
    root = _copy(COCO, tmp_path)
    (root / "val/JPEGImages/2011_000025.jpg").write_bytes(GARBAGE)
    ds = DATASETS.build("coco", root=str(root), split="val")
    with pytest.raises(DatasetError, match=r"2011_000025\.jpg: cannot decode image"):
        ds[1]
    ann_file = root / "annotations/instances_val.json"
    data = json.loads(ann_file.read_text())
    data["annotations"][3]["category_id"] = 99
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"instances_val\.json: annotation 3: category_id 99 out of range"):
        DATASETS.build("coco_instances", root=str(root), split="val")
    ann_file.write_text("{not json")
    with pytest.raises(DatasetError, match="cannot parse JSON"):
        DATASETS.build("coco", root=str(root), split="val")
