"""Models: every registered model builds and runs, shipped weights classify real digits, checkpoints load safely."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import equicore.models  # noqa: F401  (registers the models)
from equicore.errors import CheckpointError
from equicore.models import common
from equicore.models.checkpoint import (
    card_path,
    load_checkpoint,
    load_into,
    read_card,
    save_checkpoint,
    weights_digest,
)
from equicore.models.common import RANDOM_INIT, resolve_checkpoint, shipped_weights
from equicore.models.drn import DRN, BasicBlock, DRNSeg
from equicore.registry import MODELS

FIXTURES = Path(__file__).parent / "fixtures" / "mnist_foolbox"

# name -> input shape (C, H, W) for a forward pass, or None to only build it (Mask R-CNN R50 resizes to 800 px).
FORWARD_INPUTS: dict[str, tuple[int, int, int] | None] = {
    "lenet5": (1, 28, 28),
    "lenet5_mnist_clean": (1, 28, 28),
    "lenet5_mnist_adv": (1, 28, 28),
    "fashion_cnn": (1, 28, 28),
    "resnet50": (3, 32, 32),
    "drn_d_22_seg": (3, 32, 32),
    "drn_tiny_seg": (3, 96, 96),
    "deeplabv3_resnet50": (3, 32, 32),
    "deeplabv3_resnet101": (3, 32, 32),
    "deeplabv3_mobilenet_v3_large": (3, 64, 64),
    "fcn_resnet50": (3, 32, 32),
    "maskrcnn_resnet50_fpn": None,
    "maskrcnn_small": (3, 96, 96),
}


class Payload:
    """A class a malicious checkpoint could smuggle in; weights_only loading must refuse to construct it."""

    def __reduce__(self):  # what an attack would do: run code at unpickling time
        return (os.system, ("echo pwned",))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The CI machine has 2 shared cores; intra-op threads only add contention for these small inputs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_registered_model_is_covered() -> None:
    assert set(MODELS.names()) == set(FORWARD_INPUTS)


@pytest.mark.parametrize("name", sorted(FORWARD_INPUTS))
def test_model_builds_in_eval_mode_and_runs(name: str) -> None:
    torch.manual_seed(0)
    meta = MODELS.meta(name)
    model = MODELS.build(name)
    assert not model.training
    assert meta["task"] in {"classification", "segmentation", "instance"}
    shape = FORWARD_INPUTS[name]
    if shape is None:
        return
    if meta["task"] == "instance":
        with torch.no_grad():
            (out,) = model([torch.rand(shape)])
        assert set(out) >= {"boxes", "labels", "scores", "masks"}
        assert out["masks"].shape[-2:] == shape[-2:]
        return
    x = torch.rand(2, *shape)
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor)
    if meta["task"] == "classification":
        assert y.shape == (2, meta["num_classes"])
    else:
        assert y.shape == (2, meta["num_classes"], *shape[1:])
        stride = meta["output_stride"]
        assert model.output_stride == stride
        with torch.no_grad():
            low = model.logits_lowres(x)
        assert low.shape == (2, meta["num_classes"], math.ceil(shape[1] / stride), math.ceil(shape[2] / stride))
    assert torch.isfinite(y).all()


def test_normalisation_is_not_in_state_dict() -> None:
    # Non-persistent buffers: official checkpoints (without such keys) must load strictly.
    for name in ("resnet50", "drn_tiny_seg", "fashion_cnn", "deeplabv3_mobilenet_v3_large"):
        keys = MODELS.build(name).state_dict().keys()
        assert not any("normalize" in k for k in keys), name


def test_feature_layers_name_real_modules() -> None:
    for name in ("lenet5", "fashion_cnn", "drn_tiny_seg", "resnet50", "maskrcnn_small", "deeplabv3_mobilenet_v3_large"):
        modules = dict(MODELS.build(name).named_modules())
        for layer in MODELS.meta(name)["feature_layers"]:
            assert layer in modules, (name, layer)


# ------------------------------------------------------------------------------------------------------------- DRN


def test_drn_d_22_has_official_parameter_layout() -> None:
    model = MODELS.build("drn_d_22_seg", num_classes=19)
    sd = model.state_dict()
    assert sd["base.0.0.weight"].shape == (16, 3, 7, 7)  # layer0: 7x7 conv
    assert sd["base.3.0.downsample.0.weight"].shape == (64, 32, 1, 1)
    assert sd["base.6.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["base.8.0.weight"].shape == (512, 512, 3, 3)
    assert sd["seg.weight"].shape == (19, 512, 1, 1) and sd["up.weight"].shape == (19, 1, 16, 16)
    # layer5/6 are dilated 2/4 instead of strided; layer7 dilation 2.
    assert model.base[5][0].conv2.dilation == (2, 2) and model.base[6][1].conv1.dilation == (4, 4)
    assert model.base[7][0].dilation == (2, 2)
    # The classification DRN-D-22 has 16.4M parameters (Yu et al., Table 1).
    n = sum(p.numel() for p in DRN(BasicBlock, [1, 1, 2, 2, 2, 2, 1, 1], num_classes=1000).parameters())
    assert abs(n - 16.4e6) < 0.05e6


def test_drn_forward_is_upsampled_lowres_logits() -> None:
    torch.manual_seed(0)
    model = MODELS.build("drn_tiny_seg")
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        low = model.logits_lowres(x)
        assert torch.allclose(model(x), model.up(low), atol=1e-5)
        odd = model(torch.rand(1, 3, 90, 94))  # not a multiple of 8: still the input's size
    assert odd.shape == (1, 11, 90, 94)
    assert not model.up.weight.requires_grad


@pytest.mark.parametrize("stride", [8, 4])
def test_drn_output_stride_sets_logit_resolution_and_keeps_parameters(stride: int) -> None:
    torch.manual_seed(0)
    channels = (16, 16, 32, 48, 64, 80, 80, 80)
    model = DRNSeg(DRN(BasicBlock, [1] * 8, num_classes=0, channels=channels, output_stride=stride), 11).eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        low, out = model.logits_lowres(x), model(x)
    assert low.shape == (2, 11, 96 // stride, 96 // stride) and model.output_stride == stride
    assert out.shape == (2, 11, 96, 96) and torch.allclose(out, model.up(low), atol=1e-5)  # the exact deconvolution
    # Dilation instead of striding: the same trained parameters (only the fixed x s upsampling kernel differs).
    other = DRNSeg(DRN(BasicBlock, [1] * 8, num_classes=0, channels=channels, output_stride=12 - stride), 11)
    shapes = [{k: v.shape for k, v in m.state_dict().items() if k != "up.weight"} for m in (model, other)]
    assert shapes[0] == shapes[1] and model.up.weight.shape[-1] == 2 * stride
    with pytest.raises(ValueError, match="output_stride must be 4 or 8"):
        DRN(BasicBlock, [1] * 8, num_classes=0, channels=channels, output_stride=16)


def test_drn_dilations_change_where_kernels_look_not_the_parameters() -> None:
    channels = (16, 16, 32, 48, 64, 80, 80, 80)
    default = DRN(BasicBlock, [1] * 8, num_classes=0, channels=channels, output_stride=4)
    small = DRN(BasicBlock, [1] * 8, num_classes=0, channels=channels, output_stride=4, dilations=(1, 2, 2))
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    # The official doubling by default (first conv of a new level at half), the given dilations otherwise.
    assert [default.layer4[0].conv1.dilation, default.layer5[0].conv2.dilation, default.layer6[0].conv2.dilation] == [
        (1, 1),
        (4, 4),
        (8, 8),
    ]
    assert default.layer4[0].conv2.dilation == (2, 2)
    assert [small.layer4[0].conv2.dilation, small.layer5[0].conv2.dilation, small.layer6[0].conv2.dilation] == [
        (1, 1),
        (2, 2),
        (2, 2),
    ]
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        assert small.eval()(x).shape == default.eval()(x).shape == (1, 80, 24, 24)
    official = DRN(BasicBlock, [1] * 8, num_classes=0, channels=channels)  # stride 8: layer4 strided, 2 and 4 after
    assert official.layer4[0].conv1.stride == (2, 2) and official.layer6[0].conv2.dilation == (4, 4)
    # a zero dilation; a dilated layer4 at stride 8 (it is the strided one); too few and too many stages
    for bad in ((0, 2, 2), (2, 2, 4), (1, 2), (1, 2, 2, 2)):
        with pytest.raises(ValueError, match="DRN dilations"):
            DRN(BasicBlock, [1] * 8, num_classes=0, channels=channels, dilations=bad)


# -------------------------------------------------------------------------------------------------- shipped weights


def _foolbox_digits() -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted(FIXTURES.glob("mnist_*.png"))
    assert len(files) == 20
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("L"))) for f in files]).float().div(255)
    y = torch.tensor([int(f.stem.split("_")[-1]) for f in files])
    return x.unsqueeze(1), y


@pytest.mark.parametrize("name", ["lenet5_mnist_clean", "lenet5_mnist_adv"])
def test_advertorch_lenet5_weights_classify_real_digits(name: str) -> None:
    x, y = _foolbox_digits()
    model = MODELS.build(name)
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    assert correct >= 18, f"{name}: {correct}/20"


def test_shipped_weights_load_with_weights_only() -> None:
    weights = Path(equicore.models.lenet.__file__).parent / "weights"
    for f in ("mnist_lenet5_clntrained.pt", "mnist_lenet5_advtrained.pt"):
        sd = torch.load(weights / f, map_location="cpu", weights_only=True)
        assert sorted(sd) == sorted(MODELS.build("lenet5").state_dict())


@pytest.mark.parametrize("name", ["lenet5_mnist_adv", "fashion_cnn", "drn_tiny_seg", "maskrcnn_small"])
def test_models_with_shipped_weights_resolve_to_their_registered_file(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = shipped_weights(name)
    assert shipped is not None and shipped.is_file() and resolve_checkpoint(name, None, "set it") == shipped
    assert resolve_checkpoint(name, RANDOM_INIT, "set it") is None
    assert resolve_checkpoint(name, tmp_path / "mine.pt", "set it") == tmp_path / "mine.pt"
    monkeypatch.setattr(common, "WEIGHTS_DIR", tmp_path)  # an install that lost its weights
    with pytest.raises(CheckpointError, match=rf"{name}.*{tmp_path / shipped.name}.*missing.*set it"):
        resolve_checkpoint(name, None, "set it")


def test_a_model_without_shipped_weights_needs_a_checkpoint() -> None:
    assert shipped_weights("resnet50") is None
    with pytest.raises(CheckpointError, match="'resnet50' has no shipped weights: set model.checkpoint"):
        resolve_checkpoint("resnet50", None, "set model.checkpoint")


# ------------------------------------------------------------------------------------------------- checkpoint safety


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "evil.pt"
    torch.save({"w": Payload()}, p)
    with pytest.raises(CheckpointError, match="weights_only") as info:
        load_checkpoint(p)
    assert str(p) in str(info.value)
    with pytest.raises(CheckpointError, match="weights_only"):
        MODELS.build("lenet5", checkpoint=str(p))


def test_truncated_checkpoint_names_the_path(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint(MODELS.build("lenet5"), good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_into(MODELS.build("lenet5"), bad)
    assert str(bad) in str(info.value)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=str(empty)):
        load_checkpoint(empty)


def test_missing_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {p}"):
        MODELS.build("lenet5", checkpoint=str(p))


def test_other_architecture_lists_mismatches(tmp_path: Path) -> None:
    p = tmp_path / "fashion.pt"
    save_checkpoint(MODELS.build("fashion_cnn"), p)
    with pytest.raises(CheckpointError) as info:
        MODELS.build("lenet5", checkpoint=str(p))
    msg = str(info.value)
    assert str(p) in msg and "'lenet5'" in msg
    assert "missing keys [conv1.bias, conv1.weight" in msg and "unexpected [features.block1" in msg


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    sd = MODELS.build("lenet5").state_dict()
    sd["conv1.weight"] = torch.zeros(16, 1, 3, 3)
    p = tmp_path / "narrow.pt"
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match=r"shape mismatch \[conv1.weight \[16,1,3,3\] vs \[32,1,3,3\]"):
        load_into(MODELS.build("lenet5"), p, strict=False, name="lenet5")


def test_wrapped_and_dataparallel_checkpoints_load(tmp_path: Path) -> None:
    ref = MODELS.build("lenet5_mnist_clean")
    sd = ref.state_dict()
    p = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, p)
    model = MODELS.build("lenet5", checkpoint=str(p))
    assert weights_digest(model) == weights_digest(ref) == weights_digest(p)


def test_segmentation_aux_head_follows_checkpoint(tmp_path: Path) -> None:
    with_aux = MODELS.build("deeplabv3_mobilenet_v3_large", aux_loss=True)
    p = tmp_path / "aux.pt"
    save_checkpoint(with_aux, p)
    loaded = MODELS.build("deeplabv3_mobilenet_v3_large", checkpoint=str(p))  # aux_loss=None: inferred
    assert loaded.aux_classifier is not None
    with torch.no_grad():
        out = loaded.forward_dict(torch.rand(1, 3, 64, 64))
    assert out["aux"].shape == out["out"].shape == (1, 21, 64, 64)
    with pytest.raises(CheckpointError, match="unexpected"):
        MODELS.build("deeplabv3_mobilenet_v3_large", aux_loss=False, checkpoint=str(p))


# ---------------------------------------------------------------------------------------------- digest and saving


def test_weights_digest_is_stable_and_sensitive() -> None:
    a, b = MODELS.build("lenet5_mnist_clean"), MODELS.build("lenet5_mnist_clean")
    assert weights_digest(a) == weights_digest(b)
    assert weights_digest(a) != weights_digest(MODELS.build("lenet5_mnist_adv"))
    with torch.no_grad():
        b.linear2.bias[3] += 1e-6
    assert weights_digest(a) != weights_digest(b)


def test_save_checkpoint_is_atomic_and_writes_card(tmp_path: Path) -> None:
    model = MODELS.build("fashion_cnn")
    p = save_checkpoint(model, tmp_path / "sub" / "fashion.pt", meta={"model": "fashion_cnn", "epochs": 1})
    assert sorted(x.name for x in p.parent.iterdir()) == ["fashion.pt", "fashion.pt.card.json"]  # no temp files
    card = read_card(p)
    assert card is not None and card_path(p).exists()
    assert card["model"] == "fashion_cnn" and card["weights_digest"] == weights_digest(model) == weights_digest(p)
    reloaded = MODELS.build("fashion_cnn", checkpoint=str(p))
    assert weights_digest(reloaded) == weights_digest(model)
