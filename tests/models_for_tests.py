"""Tiny models and synthetic data shared by the engine tests (kept out of conftest so benches can import them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from equicore.adapters import ClassificationAdapter, SegmentationAdapter, TaskAdapter

TASKS = ("classification", "segmentation")
SELF_SUPERVISED = ("rotation", "contrastive")  # defenses that need a trained head (``tiny_head``)
NUM_CLASSES = 4
IGNORE_INDEX = 255


class TinyClassifier(nn.Module):
    """Two convs and a linear head over a fixed 2x2 adaptive pool, so any input size works (resize views). Like
    every model here it owns its normalisation (centring [0, 1] inputs).

    ``conv2`` is a stride-2 spatial layer for ``ClassificationAdapter(feature_layer="conv2")``.
    """

    def __init__(self, in_ch: int = 3, num_classes: int = NUM_CLASSES, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.fc = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1((x - 0.5) * 4.0))))
        return self.fc(F.adaptive_avg_pool2d(h, 2).flatten(1))


class TinySegmenter(nn.Module):
    """A stride-4 fully convolutional net with a dilated layer (DRN-like, in miniature). ``logits_lowres`` gives the
    1/4-resolution logits the segmentation adapter uses as features; ``forward`` upsamples them."""

    output_stride = 4

    def __init__(self, in_ch: int = 3, num_classes: int = NUM_CLASSES, width: int = 8, norm: bool = False) -> None:
        super().__init__()

        def block(cin: int, cout: int, **kw: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, bias=not norm, **kw)]
            if norm:
                layers.append(nn.BatchNorm2d(cout))
            return [*layers, nn.ReLU()]

        self.body = nn.Sequential(
            *block(in_ch, width, padding=1),
            *block(width, 2 * width, stride=2, padding=1),
            *block(2 * width, 2 * width, stride=2, padding=1),
            *block(2 * width, 2 * width, padding=2, dilation=2),
        )
        self.head = nn.Conv2d(2 * width, num_classes, 1)

    def logits_lowres(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body((x - 0.5) * 4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.logits_lowres(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def seeded_model(cls: type[nn.Module], seed: int, dtype: torch.dtype = torch.float32, **kw) -> nn.Module:
    """A randomly initialised model that is the same on every run (its own RNG state, not the global one).

    He-normal weights and zero biases: PyTorch's default init leaves such tiny nets predicting one class
    everywhere (the biases dominate), and attacks on a constant predictor test nothing.
    """
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = cls(**kw)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    finally:
        torch.random.set_rng_state(state)
    return model.to(dtype).eval()


def smooth_images(
    n: int, channels: int, size: tuple[int, int], seed: int, dtype: torch.dtype = torch.float32, cycles: float = 1.0
) -> torch.Tensor:
    """Low-frequency images in [0.1, 0.9] (sums of sinusoids of at most ``cycles`` periods across the image):
    resampling them is nearly lossless, so transform round trips can be checked tightly."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    out = torch.zeros(n, channels, h, w, dtype=torch.float64)
    for _ in range(3):
        fy, fx = (torch.rand(2, n, channels, 1, 1, generator=g, dtype=torch.float64) * 2 - 1).unbind(0)
        fy, fx = fy * cycles, fx * cycles
        phase = torch.rand(n, channels, 1, 1, generator=g, dtype=torch.float64) * 2 * math.pi
        out += torch.sin(2 * math.pi * (fy * yy + fx * xx) + phase)
    return (0.5 + 0.4 * out / 3.0).to(dtype)


def random_images(n: int, channels: int, size: tuple[int, int], seed: int, dtype=torch.float32) -> torch.Tensor:
    """Per-image varied content (a smooth pattern plus pixel noise), so even a random model's predictions differ
    between images and pixels."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, channels, *size, generator=g, dtype=torch.float64)
    smooth = smooth_images(n, channels, size, seed, dtype=torch.float64, cycles=2.0)
    return (0.6 * smooth + 0.4 * noise).clamp(0, 1).to(dtype)


def random_seg_labels(n: int, size: tuple[int, int], seed: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Random label maps with ~10% ``IGNORE_INDEX`` pixels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n, *size), generator=g)
    ignore = torch.rand(n, *size, generator=g) < 0.1
    return y.masked_fill(ignore, IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------------------
# A learnable synthetic segmentation task for behaviour tests: discs (class 1) and squares (class 2) of random
# colours on a shaded background (class 0).
# ---------------------------------------------------------------------------------------------------------------

SCENE_CLASSES = 3


def make_scenes(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.empty(n, 3, size, size)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        base = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.25
        shade = (torch.rand(3, 1, 1, generator=g) - 0.5) * 0.3 * (xx / size - 0.5)
        img = (base + shade).expand(3, size, size).clone()
        lab = torch.zeros(size, size, dtype=torch.long)
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            cls = int(torch.randint(1, SCENE_CLASSES, (), generator=g))
            r = float(torch.rand((), generator=g)) * size * 0.15 + size * 0.1
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            if cls == 1:
                m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                m = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
            # Low contrast (objects differ from the background by 0.1-0.25 per channel): the task stays easy to
            # learn, but small perturbations can flip it, like natural images and unlike saturated cartoons.
            sign = torch.randint(0, 2, (3, 1, 1), generator=g) * 2 - 1
            colour = (base + sign * (0.1 + 0.15 * torch.rand(3, 1, 1, generator=g))).clamp(0, 1)
            img = torch.where(m, colour.expand_as(img), img)
            lab[m] = cls
        images[i] = (img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1)
        labels[i] = lab
    return images, labels


def train_scene_segmenter(seed: int = 0, size: int = 32, steps: int = 200, width: int = 8) -> nn.Module:
    """Train a :class:`TinySegmenter` (with batch norm) on synthetic scenes; a few seconds on one CPU core."""
    images, labels = make_scenes(512, size, seed)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = TinySegmenter(num_classes=SCENE_CLASSES, width=width, norm=True)
    finally:
        torch.random.set_rng_state(state)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (32,), generator=g)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@dataclass
class TaskSetup:
    task: str
    adapter: TaskAdapter
    x: torch.Tensor
    y: torch.Tensor


def make_task(task: str, n: int = 4, dtype: torch.dtype = torch.float32, size: tuple[int, int] = (16, 16)) -> TaskSetup:
    """A random-init tiny model of the task with random images and labels (segmentation labels include ignored
    pixels). The classifier's equivariance features are its stride-2 ``conv2`` map."""
    x = random_images(n, 3, size, seed=7, dtype=dtype)
    if task == "classification":
        model = seeded_model(TinyClassifier, 0, dtype)
        adapter: TaskAdapter = ClassificationAdapter(model, num_classes=NUM_CLASSES, feature_layer="conv2")
        y = torch.arange(n) % NUM_CLASSES
    elif task == "segmentation":
        model = seeded_model(TinySegmenter, 0, dtype)
        adapter = SegmentationAdapter(model, num_classes=NUM_CLASSES)
        y = random_seg_labels(n, size, seed=8)
    else:
        raise ValueError(task)
    return TaskSetup(task, adapter, x, y)


def tiny_head(kind: str, task: str, path: Path, *, epochs: int = 3, seed: int = 0) -> Path:
    """A self-supervised head for :func:`make_task`'s model of ``task`` (any dtype: the backbone digest is taken in
    float32), fitted for a few steps on random images; seconds on one core. Recorded model: ``tiny_<task>``."""
    from training.heads import fit_head, head_settings, write_head

    s = make_task(task, n=2)
    images = random_images(48, 3, (16, 16), seed=21)
    settings = replace(head_settings(kind), epochs=epochs, hidden=16, batch_size=16, bank_size=32)
    fitted = fit_head(
        kind,
        s.adapter,
        images,
        model=f"tiny_{task}",
        settings=settings,
        seed=seed,
        bank_images=images[:32],
        log=lambda _m: None,
    )
    return write_head(path, fitted)


def defense_params_for(name: str, task: str, heads: dict[tuple[str, str], str]) -> dict[str, str]:
    """The extra parameters a registered defense needs to run on ``make_task``'s model of ``task``: its head file
    (from the ``selfsup_heads`` fixture) for the self-supervised defenses, nothing for the others."""
    return {"head": heads[(name, task)]} if (name, task) in heads else {}
