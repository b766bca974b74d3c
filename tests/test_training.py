"""Training recipes: a tiny run of every recipe writes a loadable checkpoint and a truthful card; the shipped
checkpoints' cards record a clean metric measured on the TEST split that meets the acceptance threshold."""

from __future__ import annotations

import json

import pytest
import torch

from equicore import training as T
from equicore.datasets import fashion_mnist, scenes
from equicore.datasets.base import Sample
from equicore.errors import DatasetError, InvalidInputError
from equicore.models.checkpoint import card_path, load_into, read_card, weights_digest
from equicore.models.common import WEIGHTS_DIR
from equicore.registry import DATASETS, MODELS


def _has_data() -> bool:
    root = fashion_mnist.FASHION_MNIST_DIR
    if not all(f.is_file() for s in ("train", "test") for f in fashion_mnist.idx_files(root, s)):
        return False
    try:
        scenes.background_dir()
    except DatasetError:
        return False
    return True


needs_data = pytest.mark.skipif(not _has_data(), reason="built-in data missing: run `python scripts/prepare_data.py`")

# Tiny runs: (training images, test images scored).
TINY = {"fashion_cnn": (64, 64), "drn_tiny_seg": (8, 8), "maskrcnn_small": (4, 2)}

# Full test-split sizes the shipped cards must have been scored on.
TEST_SIZES = {"fashion_cnn": 10000, "drn_tiny_seg": 500, "maskrcnn_small": 500}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_recipes_are_complete():
    assert list(T.TRAINING_RECIPES) == ["fashion_cnn", "drn_tiny_seg", "maskrcnn_small"]
    for name, r in T.TRAINING_RECIPES.items():
        assert r.name == name
        assert r.model in MODELS and r.dataset in DATASETS
        assert r.train_split == "train" and r.test_split == "test"
        assert r.epochs >= 1 and r.batch_size >= 2 and r.output.endswith(".pt")
        assert r.optimizer in ("sgd", "adamw") and r.schedule == "warmup_cosine"
    with pytest.raises(InvalidInputError, match="did you mean 'fashion_cnn'"):
        T.get_recipe("fashion_cn")


def test_lr_schedule_warms_up_then_decays():
    r = T.get_recipe("fashion_cnn")
    f = [T.lr_factor(r, s, 100) for s in range(100)]
    assert f[0] < f[4] <= 1.0 and max(f) == pytest.approx(1.0)
    assert f[-1] == pytest.approx(r.final_lr_frac, abs=0.01)


def test_segmentation_augmentation_keeps_labels_aligned():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 11, (4, 32, 32))
    x = (y.float() / 10).unsqueeze(1).expand(4, 3, 32, 32).contiguous()
    # Identity settings give the input back.
    xa, ya = T._augment_segmentation(x, y, g, {"hflip_p": 0.0, "scale": (1.0, 1.0)}, 255)
    assert torch.allclose(xa, x, atol=1e-5) and torch.equal(ya, y)
    # Always flipped: exactly the mirror image.
    xa, ya = T._augment_segmentation(x, y, g, {"hflip_p": 1.0, "scale": (1.0, 1.0)}, 255)
    assert torch.allclose(xa, x.flip(-1), atol=1e-5) and torch.equal(ya, y.flip(-1))
    # Zooming out pads with ignore; labels keep their values (nearest neighbour).
    xa, ya = T._augment_segmentation(x, y, g, {"hflip_p": 0.5, "scale": (0.75, 0.75)}, 255)
    assert (ya == 255).any() and set(ya.unique().tolist()) <= set(range(11)) | {255}


def test_classification_augmentation_shapes_and_range():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    xa = T._augment_classification(x, g, T.get_recipe("fashion_cnn").augmentation)
    assert xa.shape == x.shape and xa.min() >= 0 and xa.max() <= 1 + 1e-6
    same = T._augment_classification(x, g, {"hflip_p": 0.0, "scale": (1.0, 1.0), "rotate_deg": 0.0})
    assert torch.allclose(same, x, atol=1e-5)


def _instance_sample(k: int, masks: torch.Tensor, labels: list[int]) -> Sample:
    from equicore.datasets.base import masks_to_boxes

    target = {"boxes": masks_to_boxes(masks), "labels": torch.tensor(labels), "masks": masks, "image_id": k}
    return Sample(f"s{k}", torch.zeros(3, *masks.shape[-2:]), target)


def test_coco_mask_ap_perfect_wrong_and_empty():
    m = torch.zeros(2, 32, 32, dtype=torch.uint8)
    m[0, 2:12, 3:15] = 1
    m[1, 18:30, 16:28] = 1
    gt = [_instance_sample(0, m, [1, 2]), _instance_sample(1, m[:1], [3])]
    perfect = [
        {"masks": m.float().unsqueeze(1), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])},
        {"masks": m[:1].float().unsqueeze(1), "scores": torch.tensor([0.7]), "labels": torch.tensor([3])},
    ]
    ap, stats = T._coco_mask_ap(gt, perfect, ("bg", "a", "b", "c"))
    assert ap == pytest.approx(100.0) and len(stats) == 12
    wrong_class = [{**p, "labels": torch.full_like(p["labels"], 4)} for p in perfect]
    assert T._coco_mask_ap(gt, wrong_class, ("bg", "a", "b", "c", "d"))[0] == pytest.approx(0.0)
    empty = [{"masks": torch.zeros(0, 1, 32, 32), "scores": torch.zeros(0), "labels": torch.zeros(0)}] * 2
    assert T._coco_mask_ap(gt, empty)[0] == 0.0


@needs_data
def test_train_only_dataset_options_leave_the_test_split_alone():
    recipe = T.get_recipe("drn_tiny_seg")
    assert recipe.train_dataset_options == {"num_scenes": 20_000}
    train, test = T._build_split(recipe, "train"), T._build_split(recipe, "test")
    assert (train.split, len(train)) == ("train", 20_000) and (test.split, len(test)) == ("test", 500)
    # Scene i does not depend on how many scenes the split holds: the first 4000 are the default cache's.
    default = DATASETS.build("fashion_scenes", split="train")
    assert torch.equal(train[3999].image, default[3999].image) and torch.equal(train[3999].target, default[3999].target)


def test_pretrain_stage_recipe_takes_its_own_data_and_settings():
    recipe = T.get_recipe("drn_tiny_seg")
    stage = T.pretrain_recipe(recipe)
    assert stage is not None and stage.name == "drn_tiny_seg/pretrain" and stage.pretrain == {}
    assert (stage.epochs, stage.batch_size, stage.lr) == (4, 32, recipe.lr)  # lr not given: the recipe's
    assert stage.train_dataset_options == dict(recipe.pretrain["dataset_options"])
    assert (stage.model, stage.task, stage.augmentation, stage.seed) == (
        recipe.model,
        recipe.task,
        recipe.augmentation,
        recipe.seed,
    )
    assert T.pretrain_recipe(T.get_recipe("fashion_cnn")) is None
    bad = T.dataclasses.replace(recipe, pretrain={"epochs": 1, "epoch": 2})
    with pytest.raises(InvalidInputError, match="pretrain needs 'epochs' and takes only"):
        T.pretrain_recipe(bad)
    with pytest.raises(InvalidInputError, match="pretrain needs 'epochs'"):
        T.pretrain_recipe(T.dataclasses.replace(recipe, pretrain={"lr": 1e-3}))
    assert json.dumps(recipe.to_dict())  # the card's copy of the recipe is plain JSON


@needs_data
def test_pretrain_stage_data_is_its_own_split_of_the_same_scenes():
    stage = T.pretrain_recipe(T.get_recipe("drn_tiny_seg"))
    ds = T._build_split(stage, "train")
    s = ds[0]
    assert ds.split == "train" and len(ds) == 60_000 and s.image.shape == (3, 48, 48)
    # One item per scene: background plus exactly one class.
    assert len(set(s.target.unique().tolist()) - {0}) == 1


@needs_data
@pytest.mark.parametrize("name", list(T.TRAINING_RECIPES))
def test_tiny_training_run_writes_loadable_checkpoint_and_card(name, tmp_path):
    recipe = T.get_recipe(name)
    n_train, n_test = TINY[name]
    logs: list[str] = []
    card = T.train(name, tmp_path, epochs=1, limit=n_train, eval_limit=n_test, threads=1, log=logs.append)
    ckpt = tmp_path / recipe.output
    assert ckpt.is_file() and card_path(ckpt).is_file()
    assert read_card(ckpt) == card
    assert card["name"] == name and card["model"] == recipe.model and card["epochs"] == 1 and card["seed"] == 0
    assert card["data"]["split"] == "train" and card["data"]["n"] == n_train
    assert f"first {n_train} of" in card["data"]["description"]
    assert card["commands"]["script"] == f"python scripts/train.py {name} --out {tmp_path} --epochs 1 --limit {n_train}"
    assert card["commands"]["cli"].startswith(f"equi train {name} ")
    assert card["machine"]["cpu"] and card["torch_version"] == torch.__version__ and card["wall_time_s"] >= 0
    metric = card["clean_test_metric"]
    assert metric["split"] == "test" and metric["n"] == n_test and metric["metric"] == recipe.metric
    # The checkpoint loads strictly into a fresh model and the card names its exact weights.
    fresh = MODELS.build(recipe.model, **dict(recipe.model_options))
    load_into(fresh, ckpt, name=recipe.model)
    assert card["weights_digest"] == weights_digest(ckpt) == weights_digest(fresh)
    again = T.evaluate_clean(name, checkpoint=ckpt, limit=2)
    assert again["split"] == "test" and again["n"] == 2 and again["value"] == again["value"]  # not NaN
    assert json.dumps(card)  # the card is plain JSON
    stage = T.pretrain_recipe(recipe)
    if stage is None:
        assert "pretrain" not in card
    else:  # the first stage ran on its own data, capped by the same limit, and the card says so
        pre = card["pretrain"]
        assert pre["epochs"] == stage.epochs and len(pre["epoch_times_s"]) == stage.epochs
        assert pre["data"]["n"] == n_train and pre["data"]["fingerprint"] != card["data"]["fingerprint"]
        assert any(line.startswith(f"[{stage.name}] epoch {stage.epochs}/") for line in logs)
        assert "- **First stage:** " in T.render_model_cards(tmp_path)


def _shipped_card(name: str) -> dict:
    path = WEIGHTS_DIR / T.get_recipe(name).output
    card = read_card(path)
    if card is None:
        pytest.fail(f"{path} has no model card")
    return card


# Every recipe's shipped checkpoint must meet its acceptance target on the full test split (issue #3). A retrained
# checkpoint that misses it fails here: the threshold is never lowered to make it pass.
@pytest.mark.parametrize("name", list(T.TRAINING_RECIPES))
def test_shipped_card_meets_acceptance_on_test_split(name):
    recipe = T.get_recipe(name)
    card = _shipped_card(name)
    m = card["clean_test_metric"]
    assert m["split"] == "test" and m["n"] == TEST_SIZES[name] and m["metric"] == recipe.metric
    assert "test split" in m["description"]
    assert m["value"] >= recipe.acceptance
    assert card["acceptance"]["met"] is True
    assert card["weights_digest"] == weights_digest(WEIGHTS_DIR / recipe.output)


def test_shipped_instance_model_reaches_its_target_when_measured_again():
    """The card's figure is not taken on trust: re-score the shipped Mask R-CNN on the first 50 test scenes."""
    m = T.evaluate_clean("maskrcnn_small", limit=50)
    assert m["split"] == "test" and m["n"] == 50
    assert m["value"] >= T.get_recipe("maskrcnn_small").acceptance


@needs_data
def test_shipped_segmentation_card_figure_is_measured_again():
    """The segmentation card's mIoU is not taken on trust: re-score all 500 test scenes (a few seconds)."""
    card = _shipped_card("drn_tiny_seg")["clean_test_metric"]
    m = T.evaluate_clean("drn_tiny_seg")
    assert m["split"] == "test" and m["n"] == card["n"] == TEST_SIZES["drn_tiny_seg"]
    assert m["value"] == pytest.approx(card["value"], abs=1e-3)  # thread count may flip a few near-tied pixels


def test_shipped_weights_are_small():
    total = sum(
        (WEIGHTS_DIR / r.output).stat().st_size
        for r in T.TRAINING_RECIPES.values()
        if (WEIGHTS_DIR / r.output).is_file()
    )
    assert total <= 25 * 1024 * 1024


def test_model_cards_markdown_is_current():
    md = (WEIGHTS_DIR / T.CARDS_FILE).read_text()
    for card in T.load_cards():
        assert f"`{card['name']}`" in md and card["weights_digest"] in md
    assert "MNIST TRAINING-split digits" in md and "n=20" in md


def test_each_recipe_writes_the_file_its_model_is_registered_to_ship():
    """The recipe names the file training writes and the registry the file runs load: they must be one file."""
    from equicore.models.common import shipped_weights

    for name, recipe in T.TRAINING_RECIPES.items():
        assert shipped_weights(recipe.model) == T.default_checkpoint(name), name
