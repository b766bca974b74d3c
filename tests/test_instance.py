"""Instance segmentation: the Mask R-CNN adapter (features, predictions, per-sample task loss, attacks, the
equivariance defense) and the mergeable COCO mask-AP state (checked against pycocotools run directly)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from equicore.adapters import InstanceAdapter, build_adapter
from equicore.attacks import build_attack, build_loss, run_attack
from equicore.datasets.base import masks_to_boxes
from equicore.defenses import build_defense
from equicore.equivariance import equivariance_score, sample_view_params, view_features
from equicore.errors import EquirobustError, InvalidInputError
from equicore.metrics import MaskAPState, merge_all, state_from_dict
from equicore.registry import METRICS, MODELS
from equicore.transforms import build_views

WEIGHTS = Path(__file__).resolve().parents[1] / "equicore" / "models" / "weights" / "maskrcnn_small.pt"
NUM_CLASSES = 11  # maskrcnn_small: background + 10
SIZE = 64

# ---------------------------------------------------------------------------------------------- synthetic data


def rect_mask(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def make_scene(seed: int, n_items: int, size: int = SIZE, image_id: int | None = None) -> tuple[torch.Tensor, dict]:
    """A noisy background with ``n_items`` coloured rectangles; the target holds their visible masks."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, size, size, generator=g) * 0.3
    inst = torch.zeros(size, size, dtype=torch.long)
    labels = []
    for k in range(n_items):
        hh, ww = (int(v) for v in torch.randint(10, 28, (2,), generator=g))
        y0, x0 = int(torch.randint(0, size - hh, (), generator=g)), int(torch.randint(0, size - ww, (), generator=g))
        colour = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.4
        img[:, y0 : y0 + hh, x0 : x0 + ww] = colour
        inst[y0 : y0 + hh, x0 : x0 + ww] = k + 1
        labels.append(int(torch.randint(1, NUM_CLASSES, (), generator=g)))
    kept = [k for k in range(n_items) if (inst == k + 1).sum() >= 8]
    masks = (
        torch.stack([(inst == k + 1).to(torch.uint8) for k in kept])
        if kept
        else torch.zeros(0, size, size, dtype=torch.uint8)
    )
    target = {
        "boxes": masks_to_boxes(masks),
        "labels": torch.tensor([labels[k] for k in kept], dtype=torch.long),
        "masks": masks,
        "image_id": seed if image_id is None else image_id,
    }
    return img.clamp(0, 1), target


def make_batch(n: int = 2, first_id: int = 0, empty: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[dict]]:
    scenes = [make_scene(first_id + i, 0 if i in empty else 1 + i % 3) for i in range(n)]
    return torch.stack([s[0] for s in scenes]), [s[1] for s in scenes]


def shifted(mask: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    return torch.roll(mask, shifts=(dy, dx), dims=(-2, -1))


def metric_dataset(n: int = 12, seed: int = 0, h: int = 32, w: int = 40) -> tuple[list[dict], list[dict]]:
    """Ground truth (0-3 rectangles per image, 3 categories) and imperfect detections: shifted true masks with
    correct or wrong labels, false positives, missed instances, tied scores (quantised), and an image with
    detections but no ground truth."""
    g = torch.Generator().manual_seed(seed)

    def ri(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (), generator=g))

    targets, preds = [], []
    for i in range(n):
        n_gt = 0 if i == 3 else ri(0, 4)
        masks, labels = [], []
        for _ in range(n_gt):
            y0, x0 = ri(0, h - 8), ri(0, w - 8)
            masks.append(rect_mask(h, w, y0, x0, y0 + ri(4, 12), x0 + ri(4, 12)))
            labels.append(ri(1, 4))
        gt_masks = torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
        # Image ids are not 0..n-1 in order: sorting by id must not assume that.
        gt_labels = torch.tensor(labels, dtype=torch.long)
        targets.append({"masks": gt_masks, "labels": gt_labels, "image_id": 100 + 7 * ((i * 5) % n)})
        p_masks, p_labels, p_scores = [], [], []
        for m, lab in zip(masks, labels, strict=True):
            if torch.rand((), generator=g) < 0.2:
                continue  # missed
            p_masks.append(shifted(m, ri(-2, 3), ri(-2, 3)))
            p_labels.append(lab if torch.rand((), generator=g) < 0.8 else ri(1, 5))
            p_scores.append(round(float(torch.rand((), generator=g)), 1))  # ties on purpose
        for _ in range(ri(0, 3)):  # false positives
            y0, x0 = ri(0, h - 8), ri(0, w - 8)
            p_masks.append(rect_mask(h, w, y0, x0, y0 + ri(3, 8), x0 + ri(3, 8)))
            p_labels.append(ri(1, 5))
            p_scores.append(round(float(torch.rand((), generator=g)), 1))
        preds.append(
            {
                "masks": torch.stack(p_masks) if p_masks else torch.zeros(0, h, w, dtype=torch.uint8),
                "labels": torch.tensor(p_labels, dtype=torch.long),
                "scores": torch.tensor(p_scores, dtype=torch.float32),
                "boxes": torch.zeros(len(p_scores), 4),
            }
        )
    return targets, preds


def coco_direct(targets: list[dict], preds: list[dict]) -> list[float]:
    """pycocotools on hand-built COCO objects, in the data's own order (the reference)."""

    def rles(masks: torch.Tensor) -> list[dict]:
        if masks.shape[0] == 0:
            return []
        return mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))

    images, anns, dets, cats = [], [], [], set()
    for t, p in zip(targets, preds, strict=True):
        h, w = t["masks"].shape[-2:]
        images.append({"id": t["image_id"], "height": int(h), "width": int(w)})
        for r, lab in zip(rles(t["masks"]), t["labels"].tolist(), strict=True):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": t["image_id"],
                    "category_id": lab,
                    "segmentation": r,
                    "area": float(mask_utils.area(r)),
                    "bbox": mask_utils.toBbox(r).tolist(),
                    "iscrowd": 0,
                }
            )
            cats.add(lab)
        for r, lab, s in zip(rles(p["masks"]), p["labels"].tolist(), p["scores"].tolist(), strict=True):
            dets.append({"image_id": t["image_id"], "category_id": lab, "segmentation": r, "score": s})
            cats.add(lab)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(cats)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def fed(targets: list[dict], preds: list[dict], order: list[int], batch: int = 2) -> MaskAPState:
    st = MaskAPState()
    for lo in range(0, len(order), batch):
        idx = order[lo : lo + batch]
        st.update({"preds": [preds[i] for i in idx], "labels": [targets[i] for i in idx]})
    return st


# ---------------------------------------------------------------------------------------------- mask AP


def test_mask_ap_equals_pycocotools_and_any_split() -> None:
    targets, preds = metric_dataset()
    n = len(targets)
    one = fed(targets, preds, list(range(n)), batch=n)
    res = one.compute()
    ref = coco_direct(targets, preds)
    assert 0.05 < ref[0] < 0.95  # imperfect but not degenerate: a meaningful comparison
    assert res == {"mask_ap": ref[0], "mask_ap50": ref[1], "mask_ap75": ref[2]}
    assert one.n_samples == n
    rng = np.random.default_rng(0)
    for k in (1, 2, 3):
        for trial in range(2):
            perm = rng.permutation(n).tolist() if trial else list(range(n))
            shards = [fed(targets, preds, perm[j::k]) for j in range(k)]
            for order in (shards, shards[::-1]):
                merged = merge_all(order)
                assert merged.to_dict() == one.to_dict(), (k, trial)  # the state itself is split-independent
                assert merged.compute() == res, (k, trial)
                assert merged.n_samples == n
    # Grouping of merges does not matter either.
    a, b, c = (fed(targets, preds, list(range(j, n, 3))) for j in range(3))
    assert a.merge(b.merge(c)).compute() == (c.merge(a)).merge(b).compute() == res


def test_mask_ap_perfect_none_and_empty() -> None:
    targets, _ = metric_dataset(seed=1)
    perfect = [
        {"masks": t["masks"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])), "boxes": t["masks"]}
        for t in targets
    ]
    assert fed(targets, perfect, list(range(len(targets)))).compute() == {
        "mask_ap": 1.0,
        "mask_ap50": 1.0,
        "mask_ap75": 1.0,
    }
    nothing = [
        {"masks": torch.zeros(0, *t["masks"].shape[-2:], dtype=torch.uint8), "labels": [], "scores": []}
        for t in targets
    ]
    assert fed(targets, nothing, list(range(len(targets)))).compute() == {
        "mask_ap": 0.0,
        "mask_ap50": 0.0,
        "mask_ap75": 0.0,
    }
    empty = METRICS.build("mask_ap")
    assert all(math.isnan(v) for v in empty.compute().values()) and empty.n_samples == 0
    full = fed(targets, perfect, list(range(len(targets))))
    assert empty.merge(full).compute() == full.compute() == full.merge(MaskAPState()).compute()


def test_mask_ap_accepts_raw_probability_masks() -> None:
    targets, preds = metric_dataset(seed=2)
    raw = [{**p, "masks": (p["masks"].float() * 0.9)[:, None]} for p in preds]  # N x 1 x H x W probabilities
    order = list(range(len(targets)))
    assert fed(targets, raw, order).to_dict() == fed(targets, preds, order).to_dict()


def test_mask_ap_round_trips() -> None:
    targets, preds = metric_dataset(seed=3)
    st = fed(targets, preds, list(range(8)))
    for restored in (
        pickle.loads(pickle.dumps(st)),
        MaskAPState.from_dict(st.to_dict()),
        state_from_dict(json.loads(json.dumps(st.to_dict()))),
    ):
        assert isinstance(restored, MaskAPState)
        assert restored.to_dict() == st.to_dict()
        assert restored.compute() == st.compute()
        # A restored state keeps accumulating like the original.
        more = {"preds": preds[8:], "labels": targets[8:]}
        restored.update(more)
        ref = copy.deepcopy(st)
        ref.update(more)
        assert restored.to_dict() == ref.to_dict() and restored.compute() == ref.compute()
    # compute() leaves the state untouched (loadRes mutates its input; the state hands it a copy).
    before = st.to_dict()
    st.compute()
    assert st.to_dict() == before


def test_mask_ap_refuses_bad_input() -> None:
    targets, preds = metric_dataset(seed=4, n=4)
    st = fed(targets, preds, [0, 1])
    with pytest.raises(InvalidInputError, match="seen twice"):
        st.update({"preds": preds[:1], "labels": targets[:1]})
    with pytest.raises(InvalidInputError, match="share image ids"):
        st.merge(fed(targets, preds, [1, 2]))
    with pytest.raises(InvalidInputError, match="configs differ"):
        st.merge(MaskAPState(mask_threshold=0.3))
    with pytest.raises(InvalidInputError, match="image_id"):
        MaskAPState().update({"preds": preds[:1], "labels": [{k: v for k, v in targets[0].items() if k != "image_id"}]})
    with pytest.raises(InvalidInputError, match="2 predictions but 1 targets"):
        MaskAPState().update({"preds": preds[:2], "labels": targets[:1]})
    with pytest.raises(InvalidInputError, match="needs 'preds'"):
        MaskAPState().update({"labels": targets})


# ---------------------------------------------------------------------------------------------- adapter


@pytest.fixture(scope="module")
def adapter() -> InstanceAdapter:
    if WEIGHTS.is_file():
        model = MODELS.build("maskrcnn_small", checkpoint=str(WEIGHTS))
    else:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = MODELS.build("maskrcnn_small")
    out = build_adapter("instance", model, num_classes=NUM_CLASSES)
    assert isinstance(out, InstanceAdapter)
    return out


def bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers() if "running" in k or "num_batches" in k}


def test_features_are_dense_and_follow_input_size(adapter: InstanceAdapter) -> None:
    x = torch.rand(2, 3, SIZE, SIZE)
    f = adapter.features(x)
    assert f.shape == (2, 64, SIZE // 4, SIZE // 4)
    assert adapter.features(torch.rand(1, 3, 96, 128)).shape == (1, 64, 24, 32)
    assert torch.equal(adapter.forward(x).features, f)
    every = InstanceAdapter(adapter.model, feature_level="all").features(x)
    assert every.shape == (2, 64 * 5, SIZE // 4, SIZE // 4)
    assert torch.equal(every[:, :64], f)  # level 0 first, unresampled
    assert InstanceAdapter(adapter.model, feature_level="2").features(x).shape == (2, 64, SIZE // 16, SIZE // 16)
    with pytest.raises(InvalidInputError, match="feature_level"):
        InstanceAdapter(adapter.model, feature_level="5")
    with pytest.raises(InvalidInputError, match="no logits"):
        adapter.logits(x)
    with pytest.raises(InvalidInputError, match="Mask R-CNN"):
        InstanceAdapter(torch.nn.Conv2d(3, 3, 1))


def test_views_invert_onto_reference_grid_and_score_is_finite(adapter: InstanceAdapter) -> None:
    x, _ = make_batch(2)
    views = build_views(["hflip", {"name": "resize", "scale": [0.75, 1.25]}])
    params = sample_view_params(views, seed=3, in_size=(SIZE, SIZE))
    vf = view_features(adapter.features, x, views, params, batched=True)
    assert vf.reference.shape == (2, 64, SIZE // 4, SIZE // 4)
    for inv in vf.inverted:
        assert inv.shape == vf.reference.shape
    score = equivariance_score(vf)
    assert score.shape == (2,) and torch.isfinite(score).all() and (score.abs() <= 1 + 1e-6).all()
    loop = equivariance_score(view_features(adapter.features, x, views, params, batched=False))
    torch.testing.assert_close(loop, score, rtol=0, atol=1e-5)


def test_predict_gives_binary_masks_scored_by_mask_ap(adapter: InstanceAdapter) -> None:
    x, targets = make_batch(3, empty=(2,))
    preds = adapter.predict(x)
    assert len(preds) == 3 and not adapter.model.training
    for p in preds:
        n = p["scores"].shape[0]
        assert p["masks"].dtype == torch.uint8 and p["masks"].shape == (n, SIZE, SIZE)
        assert set(p["masks"].unique().tolist()) <= {0, 1}
        assert p["boxes"].shape == (n, 4) and p["labels"].shape == (n,)
    st = MaskAPState()
    st.update({"preds": preds, "labels": targets})
    res = st.compute()
    assert set(res) == {"mask_ap", "mask_ap50", "mask_ap75"} and all(0.0 <= v <= 1.0 for v in res.values())


def test_task_loss_is_per_sample_deterministic_and_differentiable(adapter: InstanceAdapter) -> None:
    model = adapter.model
    x, targets = make_batch(3, empty=(2,))
    buffers = bn_buffers(model)
    rng = torch.random.get_rng_state()
    xg = x.clone().requires_grad_(True)
    loss = adapter.task_loss(xg, targets)
    assert loss.shape == (3,) and torch.isfinite(loss).all() and (loss > 0).all()
    (grad,) = torch.autograd.grad(loss.sum(), xg)
    assert torch.isfinite(grad).all()
    for i in range(3):  # every image, the background-only one included, gets its own nonzero gradient
        assert grad[i].abs().sum() > 0
    # The caller's RNG stream is not consumed; BatchNorm statistics and training flags are unchanged.
    assert torch.equal(torch.random.get_rng_state(), rng)
    after = bn_buffers(model)
    assert buffers.keys() == after.keys() and all(torch.equal(buffers[k], after[k]) for k in buffers)
    assert not any(m.training for m in model.modules())
    # Deterministic, and each image's loss is the same alone or with other batch-mates (in any order).
    with torch.no_grad():
        again = adapter.task_loss(x, targets)
        alone = torch.cat([adapter.task_loss(x[i : i + 1], targets[i : i + 1]) for i in range(3)])
        rev = adapter.task_loss(x.flip(0), targets[::-1]).flip(0)
    assert torch.equal(again, loss.detach()) and torch.equal(alone, again) and torch.equal(rev, again)
    # ... and does not depend on the caller's global RNG state (RPN/ROI sampling is seeded per image).
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            assert torch.equal(adapter.task_loss(x, targets), again)
    # The "ce" attack loss is this task loss.
    with torch.no_grad():
        assert torch.equal(build_loss("ce", adapter, targets)(x), again)


def test_task_loss_restores_mixed_training_flags(adapter: InstanceAdapter) -> None:
    model = adapter.model
    x, targets = make_batch(1)
    try:
        model.train()
        model.roi_heads.training = False  # an odd pattern: each module's own flag must come back
        flags = [m.training for m in model.modules()]
        buffers = bn_buffers(model)
        with torch.no_grad():
            adapter.task_loss(x, targets)
        assert [m.training for m in model.modules()] == flags
        after = bn_buffers(model)
        assert all(torch.equal(buffers[k], after[k]) for k in buffers)
    finally:
        model.eval()


def test_pgd_attack_on_instance_task(adapter: InstanceAdapter) -> None:
    x, targets = make_batch(2)
    attack = build_attack("pgd", eps=8, steps=2, step_size=2)
    seeds = [11, 12]
    a = run_attack(attack, adapter, x, targets, seeds=seeds).x_adv
    b = run_attack(attack, adapter, x, targets, seeds=seeds).x_adv
    assert torch.equal(a, b)
    assert (a - x).abs().max() <= 8 / 255 + 1e-6 and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
    with torch.no_grad():
        clean, adv = adapter.task_loss(x, targets), adapter.task_loss(a, targets)
    assert (adv > clean).all(), (clean, adv)


def test_undefined_losses_and_modes_fail_clearly(adapter: InstanceAdapter) -> None:
    x, targets = make_batch(2)
    for name in ("cw", "houdini"):
        with pytest.raises(EquirobustError, match="not defined for task 'instance'"):
            run_attack(build_attack(name, eps=8, steps=1), adapter, x, targets, seeds=[1, 2])
    with pytest.raises(EquirobustError, match="targeted"):
        run_attack(build_attack("pgd", eps=8, steps=1, targeted=True), adapter, x, targets, seeds=[1, 2])
    with pytest.raises(EquirobustError, match="1 targets do not match"):
        run_attack(build_attack("pgd", eps=8, steps=1), adapter, x, targets[:1], seeds=[1, 2])
    with pytest.raises(EquirobustError, match="masks"):
        adapter.task_loss(x, [{k: v for k, v in t.items() if k != "masks"} for t in targets])


def test_equivariance_defense_purifies_instance_batch(adapter: InstanceAdapter) -> None:
    x, _ = make_batch(2)
    views: list[Any] = ["hflip", {"name": "resize", "scale": [0.75, 1.25]}]
    defense = build_defense("equivariance", steps=2, views=views).with_attack_eps(8)
    out = defense.purify(adapter, x, seeds=[5, 6])
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() <= defense.eps_v / 255 + 1e-6
    assert not torch.equal(out, x)
    assert torch.equal(out, defense.purify(adapter, x, seeds=[5, 6]))
