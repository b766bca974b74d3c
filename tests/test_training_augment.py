"""Contracts of the training augmentations (``training.augment``), in the style of kornia's augmentation tests:
identity parameters give the identity, labels, masks and boxes stay aligned with their images, pixels stay in
[0, 1], shapes and dtypes are preserved, and a seeded generator makes every draw reproducible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from equicore.datasets.base import masks_to_boxes
from training.augment import augment_classification, augment_instance, augment_segmentation, describe_augmentation
from training.recipes import get_recipe

IGNORE = 255
NO_CHANGE_CLS = {"hflip_p": 0.0, "scale": (1.0, 1.0), "rotate_deg": 0.0}
NO_CHANGE_SEG = {"hflip_p": 0.0, "scale": (1.0, 1.0)}
STRONG_SEG = {"hflip_p": 0.5, "scale": (0.75, 1.25)}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def block_labels(b: int, size: int = 32, block: int = 8, classes: int = 11, seed: int = 1) -> torch.Tensor:
    """``B x size x size`` label maps of constant ``block x block`` squares (random classes)."""
    coarse = torch.randint(0, classes, (b, size // block, size // block), generator=gen(seed))
    return coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)


def image_of(labels: torch.Tensor) -> torch.Tensor:
    """A 3-channel image whose pixels encode their label (so alignment can be read back)."""
    return (labels.float() / 10).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


# ------------------------------------------------------------------------------------------- classification


def test_classification_identity_parameters_give_the_input():
    x = torch.rand(6, 3, 28, 28, generator=gen(1))
    assert torch.allclose(augment_classification(x, gen(), NO_CHANGE_CLS), x, atol=1e-5)
    assert torch.allclose(augment_classification(x, gen(), {}), x, atol=1e-5)  # missing keys mean "no change"


def test_classification_certain_flip_is_the_mirror_image():
    x = torch.rand(4, 1, 28, 28, generator=gen(2))
    out = augment_classification(x, gen(), {**NO_CHANGE_CLS, "hflip_p": 1.0})
    assert torch.allclose(out, x.flip(-1), atol=1e-5)


def test_classification_zoom_and_rotation_are_about_the_centre():
    # With an odd size the centre pixel maps onto itself under any flip, zoom and rotation.
    x = torch.rand(8, 1, 29, 29, generator=gen(3))
    out = augment_classification(x, gen(4), {"hflip_p": 0.5, "scale": (0.8, 1.2), "rotate_deg": 30.0})
    assert torch.allclose(out[..., 14, 14], x[..., 14, 14], atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)  # the rest did move


@pytest.mark.parametrize("shape", [(8, 1, 28, 28), (3, 3, 32, 24)])
def test_classification_keeps_shape_dtype_and_range(shape):
    x = torch.rand(shape, generator=gen(5))
    out = augment_classification(x, gen(), get_recipe("fashion_cnn").augmentation)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1 + 1e-6


def test_classification_is_deterministic_under_a_seeded_generator():
    x = torch.rand(8, 1, 28, 28, generator=gen(6))
    aug = get_recipe("fashion_cnn").augmentation
    assert torch.equal(augment_classification(x, gen(7), aug), augment_classification(x, gen(7), aug))
    assert not torch.equal(augment_classification(x, gen(7), aug), augment_classification(x, gen(8), aug))
    # The global RNG is never read: reseeding it changes nothing.
    torch.manual_seed(123)
    again = augment_classification(x, gen(7), aug)
    assert torch.equal(again, augment_classification(x, gen(7), aug))


# --------------------------------------------------------------------------------------------- segmentation


def test_segmentation_identity_parameters_give_the_input():
    y = block_labels(4)
    x = image_of(y)
    xa, ya = augment_segmentation(x, y, gen(), NO_CHANGE_SEG, IGNORE)
    assert torch.allclose(xa, x, atol=1e-5) and torch.equal(ya, y)


def test_segmentation_certain_flip_mirrors_image_and_labels_together():
    y = torch.randint(0, 11, (4, 32, 32), generator=gen(9))
    x = image_of(y)
    xa, ya = augment_segmentation(x, y, gen(), {**NO_CHANGE_SEG, "hflip_p": 1.0}, IGNORE)
    assert torch.allclose(xa, x.flip(-1), atol=1e-5) and torch.equal(ya, y.flip(-1))
    # Each pixel keeps its label: the image still encodes the label map exactly.
    assert torch.allclose(xa[:, 0], ya.float() / 10, atol=1e-5)


def test_segmentation_random_zoom_keeps_labels_on_their_pixels():
    """Under random flips and zooms (in and out), wherever a pixel's whole 5x5 neighbourhood carries one label the
    image there is exactly that label's colour (bilinear sampling cannot reach a different block), and where the
    neighbourhood is all padding the image is black."""
    y = block_labels(16)
    x = image_of(y)
    xa, ya = augment_segmentation(x, y, gen(10), STRONG_SEG, IGNORE)
    win = F.unfold(ya.unsqueeze(1).float(), 5)  # B x 25 x (28 * 28): the 5x5 window of every interior pixel
    uniform = (win == win[:, :1]).all(1).reshape(16, 28, 28)
    centre_label, centre_image = ya[:, 2:-2, 2:-2], xa[:, :, 2:-2, 2:-2]
    inside = uniform & (centre_label != IGNORE)
    padding = uniform & (centre_label == IGNORE)
    # Not vacuous: block interiors are about a quarter of the pixels, and some zoom-out border shows.
    assert inside.sum() > 0.15 * inside.numel() and padding.sum() > 0
    expected = centre_label.float() / 10
    for c in range(3):
        assert torch.allclose(centre_image[:, c][inside], expected[inside], atol=1e-5)
        assert torch.all(centre_image[:, c][padding] == 0)


def test_segmentation_keeps_shapes_dtypes_range_and_label_values():
    y = block_labels(8)
    x = image_of(y)
    xa, ya = augment_segmentation(x, y, gen(11), STRONG_SEG, IGNORE)
    assert xa.shape == x.shape and xa.dtype == x.dtype and ya.shape == y.shape and ya.dtype == y.dtype
    assert xa.min() >= 0 and xa.max() <= 1 + 1e-6
    # Nearest-neighbour labels: only the input's classes, plus ignore where a zoom-out uncovered the border.
    assert set(ya.unique().tolist()) <= set(y.unique().tolist()) | {IGNORE}


def test_segmentation_is_deterministic_under_a_seeded_generator():
    y = block_labels(4)
    x = image_of(y)
    a = augment_segmentation(x, y, gen(12), STRONG_SEG, IGNORE)
    b = augment_segmentation(x, y, gen(12), STRONG_SEG, IGNORE)
    c = augment_segmentation(x, y, gen(13), STRONG_SEG, IGNORE)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# ------------------------------------------------------------------------------------------------- instance


def instance_batch(n: int = 6, size: int = 24) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Images whose pixels encode which instance covers them, with the targets a dataset gives."""
    images, targets = [], []
    for k in range(n):
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 2 : 10 + k, 1 : 7 + k] = 1  # asymmetric, so a flip is visible
        masks[1, 14:22, 12 + k // 2 : 23] = 1
        image = torch.zeros(3, size, size)
        image[:, masks[0].bool()] = 0.25
        image[:, masks[1].bool()] = 0.75
        images.append(image)
        targets.append({"boxes": masks_to_boxes(masks), "labels": torch.tensor([3, 7]), "masks": masks})
    return images, targets


def test_instance_identity_parameters_give_the_input():
    images, targets = instance_batch()
    out_i, out_t = augment_instance(images, targets, gen(), {"hflip_p": 0.0})
    for a, b, ta, tb in zip(out_i, images, out_t, targets, strict=True):
        assert torch.equal(a, b) and all(torch.equal(ta[k], tb[k]) for k in ("boxes", "labels", "masks"))


def test_instance_flip_keeps_image_masks_and_boxes_aligned():
    images, targets = instance_batch()
    before = [{k: v.clone() for k, v in t.items()} for t in targets]
    out_i, out_t = augment_instance(images, targets, gen(), {"hflip_p": 1.0})
    for img, t, src_img, src in zip(out_i, out_t, images, before, strict=True):
        assert torch.equal(img, src_img.flip(-1)) and torch.equal(t["masks"], src["masks"].flip(-1))
        assert torch.equal(t["boxes"], masks_to_boxes(t["masks"]))  # boxes still enclose their masks exactly
        assert torch.equal(t["labels"], src["labels"])
        for m, value in zip(t["masks"], (0.25, 0.75), strict=True):  # each instance's pixels kept their colour
            assert torch.all(img[:, m.bool()] == value)
    # The caller's targets are not modified in place.
    assert all(torch.equal(t["boxes"], b["boxes"]) for t, b in zip(targets, before, strict=True))


def test_instance_keeps_shapes_dtypes_and_range_and_is_deterministic():
    images, targets = instance_batch(n=12)
    a_i, a_t = augment_instance(images, targets, gen(14), {"hflip_p": 0.5})
    b_i, b_t = augment_instance(images, targets, gen(14), {"hflip_p": 0.5})
    flipped = [not torch.equal(a, src) for a, src in zip(a_i, images, strict=True)]
    assert 0 < sum(flipped) < len(images)  # p = 0.5: a per-image decision
    for a, b, src, ta, tb, tsrc in zip(a_i, b_i, images, a_t, b_t, targets, strict=True):
        assert torch.equal(a, b) and all(torch.equal(ta[k], tb[k]) for k in ("boxes", "labels", "masks"))
        assert a.shape == src.shape and a.dtype == src.dtype and a.min() >= 0 and a.max() <= 1
        assert all(ta[k].shape == tsrc[k].shape and ta[k].dtype == tsrc[k].dtype for k in ("boxes", "labels", "masks"))


def test_every_recipe_has_an_augmentation_description():
    for name in ("fashion_cnn", "drn_tiny_seg", "maskrcnn_small"):
        r = get_recipe(name)
        text = describe_augmentation(r.task, r.augmentation)
        assert text.startswith("per image: horizontal flip p=0.5")
