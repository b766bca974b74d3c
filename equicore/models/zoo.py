"""torchvision architectures, built without downloading anything (``weights=None, weights_backbone=None``).

Pretrained torchvision weights cannot be fetched on these machines; a local checkpoint (torchvision's own file or
one trained by the project) is loaded with ``checkpoint=PATH``. Every model takes images in [0, 1] and normalises
them itself (ImageNet mean/std). Parameter names are torchvision's, so torchvision checkpoints load strictly.

Segmentation models are ``SegmentationModel`` wrappers: ``forward(x)`` returns upsampled logits as a tensor (not
torchvision's dict) and ``logits_lowres(x)`` the logits before the final interpolation.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import detection, segmentation
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from equicore.models.checkpoint import load_checkpoint, load_state_into
from equicore.models.common import IMAGENET_MEAN, IMAGENET_STD, MODEL_MODULES, Normalize, finish
from equicore.registry import MODELS

CheckpointPath = str | os.PathLike[str] | None

# ---------------------------------------------------------------------------------------------------- classification


class NormalizedResNet(ResNet):
    """torchvision ResNet with ImageNet normalisation in front (non-persistent, so state_dict keys are unchanged)."""

    feature_layers = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000) -> None:
        super().__init__(block, layers, num_classes=num_classes)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.normalize(x))


# Named modules of a torchvision Mask R-CNN whose outputs can serve as dense features.
MASKRCNN_FEATURE_LAYERS = (
    "backbone.body.layer1",
    "backbone.body.layer2",
    "backbone.body.layer3",
    "backbone.body.layer4",
    "backbone.fpn",
)


@MODELS.register(
    "resnet50",
    modules=MODEL_MODULES,
    task="classification",
    dataset="imagenet",
    num_classes=1000,
    feature_layers=NormalizedResNet.feature_layers,
    weights=None,
)
def resnet50(num_classes: int = 1000, checkpoint: CheckpointPath = None) -> nn.Module:
    """ResNet-50 (torchvision layout); load e.g. torchvision's ``resnet50-*.pth`` with ``checkpoint``."""
    return finish(NormalizedResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes), checkpoint, "resnet50")


# ------------------------------------------------------------------------------------------------------ segmentation


class SegmentationModel(nn.Module):
    """Wraps a torchvision DeepLabV3/FCN: same ``backbone``/``classifier``/``aux_classifier`` names (so torchvision
    checkpoints load), ImageNet normalisation, and a tensor output.

    ``output_stride`` is the resolution of ``logits_lowres`` relative to the input (8 for the dilated ResNets,
    16 for MobileNetV3). Hookable backbone stages are listed in the registry meta ``feature_layers``.
    """

    def __init__(self, tv_model: nn.Module, output_stride: int) -> None:
        super().__init__()
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.backbone = tv_model.backbone
        self.classifier = tv_model.classifier
        self.aux_classifier = tv_model.aux_classifier  # None unless aux_loss: then no keys, as in torchvision
        self.output_stride = output_stride

    def features(self, x: Tensor) -> Tensor:
        """The backbone's output (input to the classifier head), at 1/``output_stride`` resolution."""
        return self.backbone(self.normalize(x))["out"]

    def logits_lowres(self, x: Tensor) -> Tensor:
        """Class logits at 1/``output_stride`` resolution, before the final bilinear upsampling."""
        return self.classifier(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits B x K x H x W at the input's size (torchvision's ``out``)."""
        return F.interpolate(self.logits_lowres(x), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_dict(self, x: Tensor) -> dict[str, Tensor]:
        """torchvision's output: ``{"out": ..., "aux": ...}`` (``aux`` only with an aux head), for training."""
        feats = self.backbone(self.normalize(x))
        size = x.shape[-2:]
        out = {"out": F.interpolate(self.classifier(feats["out"]), size=size, mode="bilinear", align_corners=False)}
        if self.aux_classifier is not None:
            aux = self.aux_classifier(feats["aux"])
            out["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return out


def _segmentation(
    builder: Callable[..., nn.Module],
    name: str,
    output_stride: int,
    num_classes: int,
    aux_loss: bool | None,
    checkpoint: CheckpointPath,
) -> nn.Module:
    """Build with ``aux_loss`` as given, or (None) as the checkpoint needs: an aux head iff it has aux keys."""
    sd = load_checkpoint(checkpoint, expected=name) if checkpoint is not None else None
    if aux_loss is None:
        aux_loss = sd is not None and any(k.startswith("aux_classifier.") for k in sd)
    tv = builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss)
    model = SegmentationModel(tv, output_stride)
    if sd is not None:
        load_state_into(model, sd, source=checkpoint, strict=True, name=name)
    return model.eval()


_RESNET_STAGES = ("backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4")
# MobileNetV3-Large ``features`` indices ending the stride-4, -8 and -16 stages, and the last (960-channel) layer.
_MOBILENET_STAGES = ("backbone.3", "backbone.6", "backbone.12", "backbone.16")


def _register_segmentation(
    name: str, builder: Callable[..., nn.Module], output_stride: int, backbone: str, feature_layers: tuple[str, ...]
) -> None:
    def factory(num_classes: int = 21, aux_loss: bool | None = None, checkpoint: CheckpointPath = None) -> nn.Module:
        return _segmentation(builder, name, output_stride, num_classes, aux_loss, checkpoint)

    factory.__name__ = name
    factory.__doc__ = (
        f"torchvision {name} (weights=None). ``aux_loss=None`` adds the aux head iff the checkpoint has one."
    )
    MODELS.register(
        name,
        modules=MODEL_MODULES,
        task="segmentation",
        dataset="voc",
        num_classes=21,
        output_stride=output_stride,
        backbone=backbone,
        feature_layers=feature_layers,
        weights=None,
    )(factory)


_register_segmentation("deeplabv3_resnet50", segmentation.deeplabv3_resnet50, 8, "resnet50", _RESNET_STAGES)
_register_segmentation("deeplabv3_resnet101", segmentation.deeplabv3_resnet101, 8, "resnet101", _RESNET_STAGES)
_register_segmentation(
    "deeplabv3_mobilenet_v3_large", segmentation.deeplabv3_mobilenet_v3_large, 16, "mobilenet_v3", _MOBILENET_STAGES
)
_register_segmentation("fcn_resnet50", segmentation.fcn_resnet50, 8, "resnet50", _RESNET_STAGES)


# ---------------------------------------------------------------------------------------------- instance (Mask R-CNN)
# torchvision's Mask R-CNN normalises internally (GeneralizedRCNNTransform, ImageNet mean/std) and takes a list of
# [0, 1] images; in eval mode it returns one dict per image with boxes, labels, scores and masks (N x 1 x H x W).


@MODELS.register(
    "maskrcnn_resnet50_fpn",
    modules=MODEL_MODULES,
    task="instance",
    dataset="coco",
    num_classes=91,
    feature_layers=MASKRCNN_FEATURE_LAYERS,
    weights=None,
)
def maskrcnn_resnet50_fpn(num_classes: int = 91, checkpoint: CheckpointPath = None) -> nn.Module:
    """torchvision Mask R-CNN ResNet-50-FPN (weights=None; COCO's 91 category ids including background)."""
    model = detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes)
    return finish(model, checkpoint, "maskrcnn_resnet50_fpn")


class TinyResNet(nn.Module):
    """A four-stage ResNet-18-style body with one BasicBlock per stage (strides 4, 8, 16, 32), ~0.27M params."""

    def __init__(self, channels: tuple[int, int, int, int, int] = (24, 32, 48, 64, 96)) -> None:
        super().__init__()
        c0, c1, c2, c3, c4 = channels
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(3, c0, 3, stride=2, padding=1, bias=False),
                bn=nn.BatchNorm2d(c0),
                relu=nn.ReLU(inplace=True),
            )
        )
        self.layer1 = self._stage(c0, c1, stride=2)
        self.layer2 = self._stage(c1, c2, stride=2)
        self.layer3 = self._stage(c2, c3, stride=2)
        self.layer4 = self._stage(c3, c4, stride=2)
        self.out_channels_list = [c1, c2, c3, c4]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride=stride, downsample=down))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
        return x


@MODELS.register(
    "maskrcnn_small",
    modules=MODEL_MODULES,
    task="instance",
    dataset="builtin_scenes",
    input_shape=(3, 96, 96),
    num_classes=11,
    feature_layers=MASKRCNN_FEATURE_LAYERS,
    weights="maskrcnn_small.pt",  # trained by `equi train maskrcnn_small`
)
def maskrcnn_small(
    num_classes: int = 11, min_size: int = 96, max_size: int = 128, checkpoint: CheckpointPath = None
) -> nn.Module:
    """Mask R-CNN with a tiny ResNet + FPN (64 channels) for the built-in 96x96 instance benchmark (~1.5M params).

    ``num_classes`` includes background (label 0). Anchors 8..128 px suit objects of ~10-60 px.
    """
    body = TinyResNet()
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=body.out_channels_list,
        out_channels=64,
    )
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    model = detection.MaskRCNN(
        backbone,
        num_classes=None,  # given by the predictors below
        min_size=min_size,
        max_size=max_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(64, anchors.num_anchors_per_location()[0]),
        # Far fewer proposals than the COCO defaults: scenes hold a handful of objects and this runs on CPUs.
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        box_batch_size_per_image=128,
        box_detections_per_img=30,
        box_head=TwoMLPHead(64 * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        mask_head=MaskRCNNHeads(64, [64, 64, 64, 64], 1),
        mask_predictor=MaskRCNNPredictor(64, 64, num_classes),
    )
    return finish(model, checkpoint, "maskrcnn_small")
