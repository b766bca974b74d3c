"""A local DRN-style segmentation net, used when ``equicore.models`` does not register ``drn_tiny_seg``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Block(nn.Module):
    """Residual block of two 3x3 convs (dilated), batch norm, ReLU; a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.proj(x) if self.proj is not None else x))


class LocalDRN(nn.Module):
    """Output stride 8: a stride-1 stem, three strided stages, then dilated (2, 4) stages instead of more striding
    (as in DRN-D), and a 1x1 classifier. ``logits_lowres`` is what the segmentation adapter uses as features."""

    output_stride = 8

    def __init__(self, num_classes: int = 11, widths: tuple[int, ...] = (16, 32, 48, 64, 80)) -> None:
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 7, padding=3, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        self.body = nn.Sequential(
            _Block(w0, w1, stride=2),
            _Block(w1, w2, stride=2),
            _Block(w2, w3, stride=2),
            _Block(w3, w4, dilation=2),
            _Block(w4, w4, dilation=4),
            _Block(w4, w4, dilation=2),
        )
        self.seg = nn.Conv2d(w4, num_classes, 1)

    def logits_lowres(self, x: torch.Tensor) -> torch.Tensor:
        return self.seg(self.body(self.stem((x - self.mean) / self.std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.logits_lowres(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
