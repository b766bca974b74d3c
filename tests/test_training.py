"""Training recipes: a tiny run of every recipe writes a loadable checkpoint and a truthful card; the shipped
checkpoints' cards record a clean metric measured on the TEST split that meets the acceptance threshold; the
``training`` package stays outside the engine and free of import cycles."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import training as T
from equicore.datasets import fashion_mnist, scenes
from equicore.datasets.base import Sample
from equicore.errors import DatasetError, EquirobustError, InvalidInputError
from equicore.metrics import MaskAPState
from equicore.models.checkpoint import card_path, load_into, read_card, weights_digest
from equicore.models.common import WEIGHTS_DIR
from equicore.registry import DATASETS, MODELS
from training.cards import recipes_in_card_order
from training.data import build_split
from training.evaluate import coco_mask_ap
from training.loop import lr_factor

REPO = Path(__file__).resolve().parents[1]
RECIPE_NAMES = ["fashion_cnn", "drn_tiny_seg", "maskrcnn_small"]  # card order: by task, then name


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
    assert T.RECIPES.names() == sorted(RECIPE_NAMES) and len(T.RECIPES) == 3
    assert [r.name for r in recipes_in_card_order()] == RECIPE_NAMES
    for name in RECIPE_NAMES:
        r = T.get_recipe(name)
        assert name in T.RECIPES and r.name == name and T.RECIPES.build(name) is r
        assert T.RECIPES.meta(name) == {"model": r.model, "task": r.task, "version": "1"}
        assert r.model in MODELS and r.dataset in DATASETS
        assert r.train_split == "train" and r.test_split == "test"
        assert r.epochs >= 1 and r.batch_size >= 2 and r.output.endswith(".pt")
        assert r.optimizer in ("sgd", "adamw") and r.schedule == "warmup_cosine"


def test_unknown_recipe_is_one_clear_line():
    with pytest.raises(InvalidInputError, match="did you mean 'fashion_cnn'") as exc:
        T.get_recipe("fashion_cn")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("unknown training recipe 'fashion_cn'")
    assert "known: drn_tiny_seg, fashion_cnn, maskrcnn_small" in msg


def test_equicore_never_imports_training():
    """The engine's code version hashes equicore/ only: training must stay out of it, imported by nothing there."""
    code = "import equicore, sys; assert not any(m == 'training' or m.startswith('training.') for m in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=300)


def _training_imports(path: Path) -> tuple[set[str], list[str]]:
    """(training modules ``path`` imports at module level, training imports inside functions or classes)."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        names = [n for n in names if n == "training" or n.startswith("training.")]
        if names and node in tree.body:
            top.update(names)
        elif names:
            nested.append(f"{path.name}:{node.lineno}")
    return top, nested


def test_training_package_has_no_import_cycle():
    """Module-level imports only (no function-level import hiding a cycle), and the import graph is acyclic (a
    package's ``__init__`` imports its submodules, so a submodule importing from its package would be a cycle)."""
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (REPO / "training").rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        top, nested = _training_imports(path)
        assert not nested, f"function-level training imports: {nested}"
        # "from training.x import y" names module training.x (y may be a function): keep the modules that exist.
        graph[name] = {m for m in top if m in modules and m != name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            pytest.fail(f"import cycle: {' -> '.join([*trail, node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        visit(name, [])


def test_lr_schedule_warms_up_then_decays():
    r = T.get_recipe("fashion_cnn")
    f = [lr_factor(r, s, 100) for s in range(100)]
    assert f[0] < f[4] <= 1.0 and max(f) == pytest.approx(1.0)
    assert f[-1] == pytest.approx(r.final_lr_frac, abs=0.01)


def _instance_sample(k: int, masks: torch.Tensor, labels: list[int]) -> Sample:
    from equicore.datasets.base import masks_to_boxes

    target = {"boxes": masks_to_boxes(masks), "labels": torch.tensor(labels), "masks": masks, "image_id": k}
    return Sample(f"s{k}", torch.zeros(3, *masks.shape[-2:]), target)


def _mask_ap(samples: list[Sample], preds: list[dict[str, torch.Tensor]]) -> tuple[float, list[float]]:
    state = MaskAPState()
    state.update({"preds": preds, "labels": [s.target for s in samples]})
    return coco_mask_ap(state)


def test_coco_mask_ap_perfect_wrong_and_empty():
    m = torch.zeros(2, 32, 32, dtype=torch.uint8)
    m[0, 2:12, 3:15] = 1
    m[1, 18:30, 16:28] = 1
    gt = [_instance_sample(0, m, [1, 2]), _instance_sample(1, m[:1], [3])]
    perfect = [
        {"masks": m.float().unsqueeze(1), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])},
        {"masks": m[:1].float().unsqueeze(1), "scores": torch.tensor([0.7]), "labels": torch.tensor([3])},
    ]
    ap, stats = _mask_ap(gt, perfect)
    assert ap == pytest.approx(100.0) and len(stats) == 12
    wrong_class = [{**p, "labels": torch.full_like(p["labels"], 4)} for p in perfect]
    assert _mask_ap(gt, wrong_class)[0] == pytest.approx(0.0)
    empty = [{"masks": torch.zeros(0, 1, 32, 32), "scores": torch.zeros(0), "labels": torch.zeros(0)}] * 2
    assert _mask_ap(gt, empty) == (0.0, [0.0] * 12)


@needs_data
def test_train_only_dataset_options_leave_the_test_split_alone():
    recipe = T.get_recipe("drn_tiny_seg")
    assert recipe.train_dataset_options == {"num_scenes": 20_000}
    train, test = build_split(recipe, "train"), build_split(recipe, "test")
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
    bad = dataclasses.replace(recipe, pretrain={"epochs": 1, "epoch": 2})
    with pytest.raises(InvalidInputError, match="pretrain needs 'epochs' and takes only"):
        T.pretrain_recipe(bad)
    with pytest.raises(InvalidInputError, match="pretrain needs 'epochs'"):
        T.pretrain_recipe(dataclasses.replace(recipe, pretrain={"lr": 1e-3}))
    assert json.dumps(recipe.to_dict())  # the card's copy of the recipe is plain JSON


@needs_data
def test_pretrain_stage_data_is_its_own_split_of_the_same_scenes():
    stage = T.pretrain_recipe(T.get_recipe("drn_tiny_seg"))
    ds = build_split(stage, "train")
    s = ds[0]
    assert ds.split == "train" and len(ds) == 60_000 and s.image.shape == (3, 48, 48)
    # One item per scene: background plus exactly one class.
    assert len(set(s.target.unique().tolist()) - {0}) == 1


@needs_data
@pytest.mark.parametrize("name", RECIPE_NAMES)
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
@pytest.mark.parametrize("name", RECIPE_NAMES)
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
    outputs = [WEIGHTS_DIR / T.get_recipe(name).output for name in RECIPE_NAMES]
    total = sum(p.stat().st_size for p in outputs if p.is_file())
    assert total <= 25 * 1024 * 1024


def test_model_cards_markdown_is_current():
    md = (WEIGHTS_DIR / T.CARDS_FILE).read_text()
    for card in T.load_cards():
        assert f"`{card['name']}`" in md and card["weights_digest"] in md
    assert "MNIST TRAINING-split digits" in md and "n=20" in md


def _has_mnist() -> bool:
    try:
        return all(len(DATASETS.build("mnist", split=split)) > 0 for split in ("test", "train"))
    except EquirobustError:
        return False


@pytest.mark.skipif(not _has_mnist(), reason="MNIST digits missing: run `python scripts/prepare_data.py`")
def test_model_cards_render_to_the_committed_file_byte_for_byte():
    """Re-rendering the committed JSON cards (LeNet5 accuracies measured again) gives the committed Markdown."""
    assert T.render_model_cards() == (WEIGHTS_DIR / T.CARDS_FILE).read_text()


def test_each_recipe_writes_the_file_its_model_is_registered_to_ship():
    """The recipe names the file training writes and the registry the file runs load: they must be one file."""
    from equicore.models.common import shipped_weights

    for name in RECIPE_NAMES:
        recipe = T.get_recipe(name)
        assert shipped_weights(recipe.model) == T.default_checkpoint(name), name
