"""Contracts of the invertible transforms, run over every ``TRANSFORMS`` entry, plus Compose and rotation geometry."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import equicore  # noqa: F401  (registrations)
from equicore.registry import TRANSFORMS
from equicore.seeding import generator
from equicore.transforms import ColorJitter, Compose, HorizontalFlip, InvertibleTransform, Resize, Rotate
from equicore.transforms import functional as TF
from equicore.transforms.views import VIEW_SETS, build_transform
from tests.models_for_tests import smooth_images

BASE_SIZES = [(40, 80), (64, 64), (48, 96)]
STRIDES = [1, 4, 8]
FEATURE_CHANNELS = [1, 3, 7]


def dense_features(x: torch.Tensor, stride: int, channels: int) -> torch.Tensor:
    """An equivariant stand-in for a network: a fixed positive 1x1 channel mix (commutes with every spatial map)
    then an anti-aliased resample to a 1/``stride`` grid (ceil, like a strided conv)."""
    g = torch.Generator().manual_seed(channels)
    mix = torch.rand(channels, x.shape[1], generator=g, dtype=x.dtype) + 0.1
    f = torch.einsum("dc,bchw->bdhw", mix, x)
    if stride == 1:
        return f
    size = (math.ceil(x.shape[-2] / stride), math.ceil(x.shape[-1] / stride))
    return F.interpolate(f, size=size, mode="bilinear", align_corners=False, antialias=True)


def full_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, *like.shape[-2:])
    return mask.expand_as(like)


def relative_errors(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean and max |a - b| inside the mask, relative to b's standard deviation."""
    err = (a - b).abs()[mask] / b.std()
    return float(err.mean()), float(err.max())


def roundtrip(t: InvertibleTransform, x: torch.Tensor, params: dict, stride: int, channels: int):
    ref = dense_features(x, stride, channels)
    view = dense_features(t.forward(x, params), stride, channels)
    back = t.inverse(view, params, tuple(ref.shape[-2:]))
    return ref, back, full_mask(t.valid_mask(params, tuple(ref.shape[-2:])), ref)


# ------------------------------------------------------------------------------------------------ registry contract


@pytest.mark.parametrize("name", TRANSFORMS.names())
@pytest.mark.parametrize("stride", STRIDES)
def test_inverse_recovers_dense_features(name: str, stride: int) -> None:
    """g^-1 F(g x) ~ F(x) inside the valid mask, for several feature widths, image sizes and 1/1, 1/4, 1/8 grids.
    Photometric transforms are held to exact identity on features instead (their F(g x) differs by design)."""
    t = TRANSFORMS.build(name)
    for i, (base, channels) in enumerate(zip(BASE_SIZES, FEATURE_CHANNELS, strict=True)):
        # Coarser grids get proportionally larger images so a 0.3x view still has a few feature pixels.
        size = (base[0] * max(1, stride // 2), base[1] * max(1, stride // 2))
        for seed in range(4):
            x = smooth_images(2, 3, size, seed=10 * i + seed, cycles=0.6)
            params = t.sample(generator(seed), size)
            view = t.forward(x, params)
            assert view.shape[:2] == x.shape[:2] and tuple(view.shape[-2:]) == tuple(t.out_size(params))
            if not t.is_spatial:
                f = dense_features(view, stride, channels)
                assert torch.equal(t.inverse(f, params, tuple(f.shape[-2:])), f)
                continue
            ref, back, mask = roundtrip(t, x, params, stride, channels)
            assert back.shape == ref.shape
            assert mask.float().mean() > 0.3, "the valid region must not collapse"
            mean_err, max_err = relative_errors(back, ref, mask)
            assert mean_err < 0.04 and max_err < 0.35, (name, size, stride, seed, mean_err, max_err)


@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_vector_features_have_identity_inverse(name: str) -> None:
    t = TRANSFORMS.build(name)
    params = t.sample(generator(3), (24, 40))
    v = torch.randn(5, 11)
    out = t.inverse(v, params, (3, 5))
    assert torch.equal(out, v)


@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_sampling_is_deterministic_and_params_are_plain_data(name: str) -> None:
    t = TRANSFORMS.build(name)
    draws_a = [t.sample(generator(s), (40, 80)) for s in range(6)]
    draws_b = [t.sample(generator(s), (40, 80)) for s in range(6)]
    assert draws_a == draws_b
    for p in draws_a:
        assert_plain(p)
        assert pickle.loads(pickle.dumps(p)) == p
        assert tuple(p["in_size"]) == (40, 80)
    x = smooth_images(1, 3, (40, 80), seed=0)
    assert torch.equal(t.forward(x, draws_a[0]), t.forward(x, pickle.loads(pickle.dumps(draws_a[0]))))
    # A transform with a random range must actually use the generator.
    if name in ("resize", "rotate", "color_jitter"):
        assert len({repr(p) for p in draws_a}) > 1


def assert_plain(value: object) -> None:
    """Params are loggable plain data: no tensors, generators or objects."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            assert_plain(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            assert_plain(v)
    else:
        assert value is None or type(value) in (int, float, bool, str), f"{value!r} is not plain data"


@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_forward_keeps_images_in_range(name: str) -> None:
    t = TRANSFORMS.build(name)
    x = torch.rand(3, 3, 20, 28, generator=torch.Generator().manual_seed(0))
    for s in range(5):
        y = t.forward(x, t.sample(generator(s), (20, 28)))
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0 + 1e-6


def test_every_view_set_builds_and_samples() -> None:
    for name, make in VIEW_SETS.items():
        views = make()
        assert views, name
        for v in views:
            assert_plain(v.sample(generator(1), (32, 48)))
    assert len(VIEW_SETS["paper"]()) == 8


# ------------------------------------------------------------------------------------------------ specific geometry


def test_photometric_inverse_is_identity_on_features() -> None:
    cj = ColorJitter(0.3, 0.3, 0.3, grayscale_p=0.5)
    f = torch.randn(2, 6, 5, 10)
    for s in range(5):
        p = cj.sample(generator(s), (40, 80))
        assert torch.equal(cj.inverse(f, p, (5, 10)), f)
    x = smooth_images(2, 3, (40, 80), seed=1)
    p = {"brightness": 1.2, "contrast": 0.8, "saturation": 0.7, "grayscale": False, "in_size": (40, 80)}
    assert not torch.allclose(cj.forward(x, p), x)  # it does change the image


def test_hflip_and_rotation_fail_with_a_wrong_inverse() -> None:
    """Negative controls: the round-trip check above is sensitive enough to catch a missing or mirrored inverse."""
    x = smooth_images(2, 3, (64, 128), seed=5)
    for t, params in (
        (HorizontalFlip(), {"in_size": (64, 128)}),
        (Rotate((30.0, 30.0)), {"angle": 30.0, "in_size": (64, 128)}),
    ):
        ref, back, mask = roundtrip(t, x, params, 4, 3)
        good, _ = relative_errors(back, ref, mask)
        view = dense_features(t.forward(x, params), 4, 3)
        # Flip: no inverse at all. Rotation: rotating further instead of back.
        wrong = TF.rotate(view, params["angle"]) if isinstance(t, Rotate) else view
        bad, _ = relative_errors(wrong, ref, mask)
        assert good < 0.02 and bad > 5 * good, (t, good, bad)


def test_compose_inverts_in_reverse_order() -> None:
    """flip + rotate(30) + resize(1.5x) round-trips; inverting the children in forward order does not (flip and
    rotation do not commute), so the order really matters."""
    c = Compose([HorizontalFlip(), Rotate((30.0, 30.0)), Resize((1.5, 1.5))])
    size = (64, 128)
    x = smooth_images(2, 3, size, seed=2)
    params = c.sample(generator(0), size)
    assert tuple(c.out_size(params)) == (96, 192)
    for stride in (1, 4, 8):
        ref, back, mask = roundtrip(c, x, params, stride, 3)
        mean_err, _ = relative_errors(back, ref, mask)
        assert mean_err < 0.04, (stride, mean_err)
        # Undo the resize, then the flip before the rotation: the children's inverses in the wrong order.
        f = TF.resize_to(dense_features(c.forward(x, params), stride, 3), tuple(ref.shape[-2:]), antialias=False)
        f = TF.rotate(TF.hflip(f), -30.0)
        wrong_err, _ = relative_errors(f, ref, mask)
        assert wrong_err > 5 * mean_err, (stride, mean_err, wrong_err)


def test_compose_from_spec_matches_direct_compose() -> None:
    spec = {"name": "compose", "transforms": ["hflip", {"name": "rotate", "degrees": [10, 10]}]}
    c = build_transform(spec)
    assert isinstance(c, Compose) and [type(t) for t in c.transforms] == [HorizontalFlip, Rotate]
    p = c.sample(generator(0), (16, 32))
    assert p["children"][1]["angle"] == 10.0


def test_compose_mask_covers_only_real_pixels() -> None:
    """Inside the composed valid mask, the round trip of an all-ones image stays ~1 (no padded corner leaks in),
    also when a flip precedes the rotation on a non-square canvas (the rotation's mask must be mirrored)."""
    for c in (
        Compose([HorizontalFlip(), Rotate((30.0, 30.0))]),
        Compose([Rotate((-25.0, -25.0)), HorizontalFlip()]),
        Compose([Resize((1.5, 1.5), aspect_jitter=0.4), Rotate((20.0, 20.0)), HorizontalFlip()]),
    ):
        for size in ((40, 80), (5, 10)):
            params = c.sample(generator(0), size)
            ones = torch.ones(1, 1, *size)
            back = c.inverse(c.forward(ones, params), params, size)
            mask = full_mask(c.valid_mask(params, size), back)
            assert float(back[mask].min()) > 0.99, (c, size)
            assert mask.float().mean() > 0.3


def test_rotation_is_rigid_on_non_square_images() -> None:
    """A soft-edged centred disc on a 40x80 canvas is unchanged by rotation inside the valid mask; a rotation in
    plain normalised coordinates would shear it into an ellipse (checked as a negative control)."""
    h, w = 40, 80
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5 - h / 2, torch.arange(w) + 0.5 - w / 2, indexing="ij")
    disc = torch.sigmoid((14.0 - (yy**2 + xx**2).sqrt()) * 2.0).view(1, 1, h, w)
    for angle in (-15.0, 30.0, 75.0):
        rotated = TF.rotate(disc, angle)
        mask = TF.rotation_valid_mask(angle, (h, w))
        assert float((rotated - disc).abs()[mask].max()) < 0.08, angle
        a = math.radians(angle)
        sheared_theta = torch.tensor([[[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0]]])
        grid = F.affine_grid(sheared_theta, [1, 1, h, w], align_corners=False)
        sheared = F.grid_sample(disc, grid, align_corners=False)
        assert float((sheared - disc).abs()[mask].max()) > 0.3, angle


def test_rotation_valid_mask_excludes_corners() -> None:
    h, w = 40, 80
    for angle in (15.0, -30.0):
        mask = TF.rotation_valid_mask(angle, (h, w))
        assert mask.shape == (1, 1, h, w) and mask.dtype == torch.bool
        m = mask[0, 0]
        assert not m[0, 0] and not m[0, -1] and not m[-1, 0] and not m[-1, -1]
        assert m[h // 2, w // 2]
        assert 0.4 < float(m.float().mean()) < 0.95
        # Every pixel in the mask was really seen: rotating an all-ones image there and back keeps it at ~1.
        ones = torch.ones(1, 1, h, w)
        back = TF.rotate(TF.rotate(ones, angle), -angle)
        assert float(back[mask].min()) > 0.99
    assert Rotate((0.0, 0.0)).valid_mask({"angle": 0.0, "in_size": (8, 8)}, (8, 8)).all()
    # At 1/8 resolution the mask lives on the feature grid.
    assert Rotate().valid_mask({"angle": 10.0, "in_size": (40, 80)}, (5, 10)).shape == (1, 1, 5, 10)
