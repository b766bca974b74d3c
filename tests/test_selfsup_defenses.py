"""The self-supervised baselines (rotation, contrastive): their heads, batch-mate independence, the shipped heads'
held-out figures, bad input, and a pipeline run through ``defend_shard``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import equicore  # noqa: F401  (registrations)
from equicore import heads as H
from equicore.adapters import ClassificationAdapter, TaskAdapter, build_adapter
from equicore.defenses import ContrastiveDefense, RotationDefense, build_defense
from equicore.errors import CheckpointError, EquirobustError, InvalidInputError
from equicore.heads import cache as head_cache
from equicore.heads import format as head_format
from equicore.models.checkpoint import read_card, save_checkpoint, weights_digest
from equicore.models.common import WEIGHTS_DIR
from equicore.registry import DATASETS, MODELS
from equicore.transforms import build_views
from tests.models_for_tests import SELF_SUPERVISED, TinyClassifier, make_task, random_images, seeded_model
from tests.pipeline_helpers import mnist_root, table_rows, tiny_config
from training.heads import (
    contrastive_eval,
    defense_view_features,
    fit_head,
    head_settings,
    rotation_accuracy,
    rotation_features,
    write_head,
)

SHIPPED = {"lenet5_mnist_adv": "relu2", "fashion_cnn": "features.block2"}


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """The 20 real MNIST test digits of tests/fixtures (foolbox), 1 x 28 x 28 in [0, 1]."""
    ds = DATASETS.build("mnist", root=str(mnist_root(tmp_path_factory.mktemp("digits"))), split="test")
    return torch.stack([ds[i].image for i in range(len(ds))])


def shipped_adapter(model: str, dtype: torch.dtype = torch.float32) -> TaskAdapter:
    """The shipped model (fashion_cnn's trained weights are a file beside the code; LeNet5 loads its own)."""
    net = (
        MODELS.build(model, checkpoint=WEIGHTS_DIR / "fashion_cnn.pt")
        if model == "fashion_cnn"
        else MODELS.build(model)
    )
    net = net.to(dtype).eval()
    adapter = build_adapter("classification", net, feature_layer=SHIPPED[model])
    adapter.model_name = model
    return adapter


# ------------------------------------------------------------------------------------------- per-image results


@pytest.mark.parametrize("kind", SELF_SUPERVISED)
def test_an_image_gets_the_same_result_whatever_its_batch_mates(kind: str, digits: torch.Tensor) -> None:
    """The shipped head on the real LeNet5, in float64 (the head and the weights digest are float32; a float64 copy
    of the model is accepted): bit-identical alone, in a batch of 8, and among other images in another order."""
    adapter = shipped_adapter("lenet5_mnist_adv", torch.float64)
    x = digits[:8].double()
    seeds = [11 * i + 3 for i in range(8)]
    d = build_defense(kind, steps=4, eps_v=16.0)
    full = d.purify(adapter, x, seeds)
    for i in (0, 5):
        alone = d.purify(adapter, x[i : i + 1], seeds[i : i + 1])
        assert torch.equal(alone, full[i : i + 1])
    others = torch.cat([digits[12:15].double(), x[5:6], digits[18:20].double()])
    mixed = d.purify(adapter, others, [7, 8, 9, seeds[5], 10, 11])
    assert torch.equal(mixed[3:4], full[5:6])


@pytest.mark.parametrize("kind", SELF_SUPERVISED)
def test_purify_stays_in_the_ball_and_repeats_with_its_seeds(kind: str, digits: torch.Tensor) -> None:
    adapter = shipped_adapter("lenet5_mnist_adv")
    x = digits[:6]
    d = build_defense(kind, steps=3).with_attack_eps(8.0)
    assert d.eps_v == 12.0 and d.optimizes_at_test_time and d.randomized
    a = d.purify(adapter, x, list(range(6)))
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert float((a - x).abs().max()) <= 12.0 / 255 + 1e-6
    assert float((a - x).abs().max()) > 6.0 / 255
    assert torch.equal(a, d.purify(adapter, x.clone(), list(range(6))))
    b = d.purify(adapter, x, list(range(100, 106)))
    assert all(not torch.equal(a[i], b[i]) for i in range(6))
    quiet = build_defense(kind, steps=3, noise=False).with_attack_eps(8.0)
    assert not quiet.randomized
    assert torch.equal(quiet.purify(adapter, x, [1] * 6), quiet.purify(adapter, x, [2] * 6))


@pytest.mark.parametrize("kind", SELF_SUPERVISED)
def test_score_is_per_sample_and_differentiable(kind: str, digits: torch.Tensor) -> None:
    adapter = shipped_adapter("lenet5_mnist_adv")
    d = build_defense(kind)
    x = digits[:4].clone().requires_grad_(True)
    s = d.score(adapter, x, 3)
    assert s.shape == (4,) and torch.isfinite(s).all() and bool((s <= 0).all())  # minus a loss
    (g,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(g).all() and all(float(g[i].abs().sum()) > 0 for i in range(4))
    x2 = digits[:4].clone()
    x2[1] = 1 - x2[1]
    assert torch.equal(d.score(adapter, x2, 3)[0], s[0].detach())


def test_rotation_defense_lowers_the_rotation_loss_of_rotated_digits(digits: torch.Tensor) -> None:
    """Sanity case: digits turned by 90 degrees look rotated to the head (high loss for 'this is upright'); the
    defense's small repair lowers the rotation loss of every one of them."""
    adapter = shipped_adapter("lenet5_mnist_adv")
    x = torch.rot90(digits[:8], 1, dims=(-2, -1)).contiguous()
    d = build_defense("rotation", steps=10, eps_v=16.0, noise=False)
    with torch.no_grad():
        before = -d.score(adapter, x)
        upright = -d.score(adapter, digits[:8])
    assert float(before.mean()) > float(upright.mean())  # the rotated copies really are harder
    out = d.purify(adapter, x, list(range(8)))
    with torch.no_grad():
        after = -d.score(adapter, out)
    assert bool((after < before).all()), (before, after)


def test_contrastive_defense_lowers_info_nce(digits: torch.Tensor) -> None:
    adapter = shipped_adapter("lenet5_mnist_adv")
    d = build_defense("contrastive", steps=10, eps_v=16.0, noise=False, resample_views=False)
    x = digits[:8]
    with torch.no_grad():
        before = -d.score(adapter, x)
    out = d.purify(adapter, x, list(range(8)))
    with torch.no_grad():
        after = -d.score(adapter, out)
    assert float(after.mean()) < float(before.mean())


# -------------------------------------------------------------------------------------------------- shipped heads


@pytest.mark.parametrize("kind", SELF_SUPERVISED)
def test_shipped_lenet_heads_beat_chance_on_the_mnist_test_digits(kind: str, digits: torch.Tensor) -> None:
    """Measured now on the 20 real MNIST test digits; the card was measured on the same images and must agree."""
    adapter = shipped_adapter("lenet5_mnist_adv")
    path = H.shipped_head_path("lenet5_mnist_adv", kind)
    art = H.read_head(path, expected_kind=kind)
    card = read_card(path)
    assert card is not None and card["held_out"]["split"] == "test" and card["data"]["split"] == "train"
    assert card["backbone"]["weights_digest"] == weights_digest(adapter.model) == art.meta.backbone_digest
    assert card["head"]["feature_layer"] == "relu2" == art.meta.feature_layer
    if kind == "rotation":
        figures = rotation_accuracy(art.head, rotation_features(adapter, digits, art.meta.grid))
    else:
        assert art.bank is not None
        feats = defense_view_features(adapter, digits, build_views(head_settings(kind).views), art.meta.grid)
        figures = contrastive_eval(art.head, feats, art.bank, art.meta.temperature)
    assert figures["value"] > figures["chance"]
    assert figures["value"] == pytest.approx(card["held_out"]["value"], abs=1e-6)


@pytest.mark.parametrize("kind", SELF_SUPERVISED)
def test_shipped_fashion_heads_beat_chance_on_fashion_mnist_test_images(kind: str) -> None:
    try:
        ds = DATASETS.build("fashion_mnist", split="test")
    except EquirobustError as e:
        pytest.skip(f"Fashion-MNIST not prepared: {e}")
    x = torch.stack([ds[i].image for i in range(200)])
    adapter = shipped_adapter("fashion_cnn")
    art = H.load_head_for(adapter, kind, None, kind)
    if kind == "rotation":
        figures = rotation_accuracy(art.head, rotation_features(adapter, x, art.meta.grid))
    else:
        assert art.bank is not None
        feats = defense_view_features(adapter, x, build_views(head_settings(kind).views), art.meta.grid)
        figures = contrastive_eval(art.head, feats, art.bank, art.meta.temperature)
    assert figures["value"] > figures["chance"], figures


def test_head_artefacts_load_weights_only_and_describe_themselves() -> None:
    for model in SHIPPED:
        for kind in SELF_SUPERVISED:
            path = H.shipped_head_path(model, kind)
            sd = torch.load(path, map_location="cpu", weights_only=True)
            assert all(isinstance(v, torch.Tensor) for v in sd.values())
            meta = H.decode_meta(sd["meta"])
            assert meta["kind"] == kind and meta["model"] == model and meta["feature_layer"] == SHIPPED[model]
            card = json.loads(Path(f"{path}.card.json").read_text())
            assert card["weights_digest"] == weights_digest(path)
            assert card["commands"]["cli"].startswith(
                f"equi train-head {kind} {model} --feature-layer {SHIPPED[model]}"
            )
            assert (kind == "contrastive") == ("bank" in sd)


# ------------------------------------------------------------------------------------------------------ bad input


def test_missing_head_files_name_the_path_and_the_command(tmp_path: Path, monkeypatch) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError) as e:
        build_defense("rotation", head=str(missing))
    assert str(missing) in one_line(e) and "equi train-head rotation" in str(e.value)

    monkeypatch.setattr(head_format, "HEADS_DIR", tmp_path / "heads")  # where shipped heads are looked up
    adapter = shipped_adapter("lenet5_mnist_adv")
    for kind in SELF_SUPERVISED:
        with pytest.raises(CheckpointError) as e:
            build_defense(kind, eps_v=8.0).purify(adapter, torch.rand(1, 1, 28, 28))
        msg = one_line(e)
        assert f"no {kind} head for model 'lenet5_mnist_adv' at {tmp_path / 'heads'}" in msg
        assert f"`equi train-head {kind} lenet5_mnist_adv --feature-layer relu2`" in msg

    anonymous = make_task("classification", n=1)
    with pytest.raises(CheckpointError) as e:
        build_defense("contrastive", eps_v=8.0).purify(anonymous.adapter, anonymous.x)
    assert "adapter.model_name is None" in one_line(e) and "head=PATH" in str(e.value)


def test_a_head_of_another_model_is_refused_naming_both(selfsup_heads) -> None:
    s = make_task("classification", n=2)
    head = selfsup_heads[("rotation", "classification")]
    s.adapter.model_name = "lenet5_mnist_adv"
    with pytest.raises(CheckpointError) as e:
        build_defense("rotation", head=head, eps_v=8.0).purify(s.adapter, s.x)
    msg = one_line(e)
    assert "trained for model 'tiny_classification'" in msg and "runs model 'lenet5_mnist_adv'" in msg
    # The same architecture with other weights: the digests differ.
    other = ClassificationAdapter(seeded_model(TinyClassifier, 1), feature_layer="conv2")
    recorded = H.read_head(head).meta.backbone_digest
    with pytest.raises(CheckpointError) as e:
        build_defense("rotation", head=head, eps_v=8.0).purify(other, s.x)
    msg = one_line(e)
    assert recorded[:12] in msg and weights_digest(other.model)[:12] in msg and "retrain the head" in msg
    # A shipped head given to the other shipped model.
    adapter = shipped_adapter("lenet5_mnist_adv")
    with pytest.raises(CheckpointError) as e:
        build_defense("contrastive", head=str(H.shipped_head_path("fashion_cnn", "contrastive")), eps_v=8.0).purify(
            adapter, torch.rand(1, 1, 28, 28)
        )
    assert "'fashion_cnn'" in one_line(e) and "'lenet5_mnist_adv'" in str(e.value)


def test_a_head_of_another_feature_layer_is_refused(selfsup_heads) -> None:
    s = make_task("classification", n=2)
    adapter = ClassificationAdapter(s.adapter.model, feature_layer="conv1")
    for kind in SELF_SUPERVISED:
        with pytest.raises(CheckpointError) as e:
            build_defense(kind, head=selfsup_heads[(kind, "classification")], eps_v=8.0).purify(adapter, s.x)
        msg = one_line(e)
        assert "feature layer 'conv2'" in msg and "adapter's features are 'conv1'" in msg
    lenet = shipped_adapter("lenet5_mnist_adv")
    lenet_other = build_adapter("classification", lenet.model, feature_layer="relu1")
    lenet_other.model_name = "lenet5_mnist_adv"
    with pytest.raises(CheckpointError, match=r"feature layer 'relu2' .* adapter's features are 'relu1'"):
        build_defense("rotation", eps_v=8.0).purify(lenet_other, torch.rand(1, 1, 28, 28))


def test_wrong_kind_wrong_file_and_wrong_channels(tmp_path: Path, selfsup_heads) -> None:
    s = make_task("classification", n=2)
    with pytest.raises(CheckpointError) as e:
        build_defense("contrastive", head=selfsup_heads[("rotation", "classification")], eps_v=8.0).purify(
            s.adapter, s.x
        )
    assert "is a rotation head, not a contrastive head" in one_line(e)

    model_file = save_checkpoint(s.adapter.model, tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as e:
        build_defense("rotation", head=str(model_file), eps_v=8.0).purify(s.adapter, s.x)
    assert "is not a self-supervised head" in one_line(e)

    # A head that claims the right model and layer but 3 input channels (conv2 has 8).
    good = H.read_head(selfsup_heads[("rotation", "classification")])
    meta = H.HeadMeta(**{**good.meta.to_dict(), "in_channels": 3})
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(H.head_state(meta, H.build_head(meta)), wrong)
    with pytest.raises(InvalidInputError) as e:
        build_defense("rotation", head=str(wrong), eps_v=8.0).purify(s.adapter, s.x)
    msg = one_line(e)
    assert "expects 3-channel dense features" in msg and "8-channel dense" in msg


def test_a_head_file_is_read_once_per_model(selfsup_heads, monkeypatch) -> None:
    H.clear_head_cache()
    calls = []
    original = H.read_head
    monkeypatch.setattr(head_cache, "read_head", lambda *a, **k: calls.append(a) or original(*a, **k))
    s = make_task("segmentation", n=2)
    d = build_defense("contrastive", head=selfsup_heads[("contrastive", "segmentation")], steps=2, eps_v=8.0)
    d.purify(s.adapter, s.x, [1, 2])
    d.purify(s.adapter, s.x, [1, 2])
    assert len(calls) == 1


def test_self_supervised_params_record_the_heads_they_read(selfsup_heads) -> None:
    head = selfsup_heads[("rotation", "segmentation")]
    p = build_defense("rotation", head=head).params()
    assert p["head_files"] == {head: H.file_sha256(head)}
    shipped = build_defense("contrastive").params()["head_files"]
    assert set(shipped) >= {f"{m}.contrastive.pt" for m in SHIPPED}
    assert isinstance(build_defense("rotation"), RotationDefense)
    assert isinstance(build_defense("contrastive"), ContrastiveDefense)


def test_fit_head_on_a_float64_model_gives_the_float32_digest(tmp_path: Path) -> None:
    s32, s64 = make_task("segmentation", n=2), make_task("segmentation", n=2, dtype=torch.float64)
    assert H.backbone_digest(s64.adapter.model) == H.backbone_digest(s32.adapter.model)
    assert H.backbone_digest(s32.adapter.model) == weights_digest(s32.adapter.model)
    fitted = fit_head("rotation", s64.adapter, random_images(8, 3, (16, 16), seed=1), model="m", log=lambda _m: None)
    path = write_head(tmp_path / "h.pt", fitted)
    assert H.read_head(path).meta.backbone_digest == weights_digest(s32.adapter.model)


# ------------------------------------------------------------------------------------------------------- pipeline


def test_configs_name_the_self_supervised_defenses(tmp_path: Path) -> None:
    from tasks.config import ConfigError, parse_config

    cfg = tiny_config(tmp_path, defenses=[{"name": "rotation"}, {"name": "contrastive", "steps": 10}])
    parsed = parse_config(cfg)
    assert [d.name for d in parsed.defenses] == ["rotation", "contrastive"]
    bad = tiny_config(tmp_path, defenses=[{"name": "rotation", "head": str(tmp_path / "missing.pt")}])
    with pytest.raises(ConfigError, match=r"head file .*missing\.pt not found"):
        parse_config(bad)


@pytest.mark.slow
def test_pipeline_runs_both_defenses_identically_under_any_sharding(tmp_path: Path) -> None:
    """Through ``defend_shard`` in-process, with the shipped heads of the adversarially trained LeNet5 found by the
    runtime's model name: one shard of 10 or two of 5 give the same table."""
    from flows import pipeline
    from tasks.config import parse_config

    tables = []
    for shard_size in (10, 5):
        raw = tiny_config(
            tmp_path / f"s{shard_size}",
            shard_size=shard_size,
            model={"name": "lenet5_mnist_adv", "adapter": {"feature_layer": "relu2"}},
            defenses=[
                {"name": "vanilla"},
                {"name": "rotation", "steps": 2, "eps_v": 16},
                {"name": "contrastive", "steps": 2, "eps_v": 16},
            ],
            cluster={"in_process": True, "torch_threads": 1},
        )
        raw["dataset"]["limit"] = 10
        cfg = parse_config(raw)
        summary = pipeline.run(cfg)
        assert summary.ok, summary.failed
        tables.append(table_rows(cfg.results_dir, cfg.run_id()))
    assert tables[0] == tables[1]
    defended = {(r[0], r[1]) for r in tables[0] if r[2] == "accuracy"}
    assert {("pgd", "rotation"), ("pgd", "contrastive"), ("clean", "rotation")} <= defended


def test_a_run_whose_model_has_no_shipped_head_fails_before_writing(tmp_path: Path) -> None:
    """The clean LeNet5 ships no heads: the run stops at the pre-flight check with the train-head command, before
    any manifest, cache entry or result is written."""
    from flows import pipeline
    from tasks.config import parse_config

    cfg = parse_config(tiny_config(tmp_path, defenses=[{"name": "rotation"}], cluster={"in_process": True}))
    with pytest.raises(EquirobustError, match=r"equi train-head rotation lenet5_mnist_clean"):
        pipeline.run(cfg)
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_pipeline_keys_name_only_the_run_models_head(tmp_path: Path) -> None:
    from tasks.config import parse_config
    from tasks.runtime import build_runtime
    from tasks.units import plan_units

    raw = tiny_config(tmp_path, model={"name": "lenet5_mnist_adv", "adapter": {"feature_layer": "relu2"}})
    raw["defenses"] = [{"name": "rotation"}]
    units = plan_units(build_runtime(parse_config(raw)))
    assert all(list(u.defense_params["head_files"]) == ["lenet5_mnist_adv.rotation.pt"] for u in units.pairs)


# ------------------------------------------------------------------------------------------- the training command


def _has(dataset: str, **params) -> bool:
    try:
        DATASETS.build(dataset, **params)
    except EquirobustError:
        return False
    return True


@pytest.mark.skipif(not _has("mnist", split="train"), reason="MNIST train digits missing: run scripts/prepare_data.py")
def test_equi_train_head_writes_a_head_and_card_the_defense_accepts(tmp_path: Path, digits: torch.Tensor) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["train-head", "rotation", "lenet5_mnist_adv", "--limit", "64"]  # feature layer: the default, relu2
    result = CliRunner().invoke(app, [*args, "--eval-limit", "8", "--epochs", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    path = tmp_path / "lenet5_mnist_adv.rotation.pt"
    card = read_card(path)
    assert card is not None and card["data"]["n"] == 64 and card["data"]["split"] == "train"
    assert card["held_out"]["split"] == "test" and card["held_out"]["n"] == 8 and card["epochs"] == 2
    assert card["head"]["feature_layer"] == "relu2" and card["wall_time_s"] > 0
    assert card["commands"]["cli"].startswith("equi train-head rotation lenet5_mnist_adv --feature-layer relu2")
    out = build_defense("rotation", head=str(path), steps=2, eps_v=8.0).purify(
        shipped_adapter("lenet5_mnist_adv"), digits[:2], [1, 2]
    )
    assert out.shape == (2, 1, 28, 28)


@pytest.mark.parametrize(
    "args, message",
    [
        (["flip", "fashion_cnn"], "head kind: expected one of ['rotation', 'contrastive'], got 'flip'"),
        (["rotation", "fashion_cn"], "unknown model 'fashion_cn'; did you mean 'fashion_cnn'"),
        (["rotation", "fashion_cnn", "--bank-size", "8"], "bank_size: only the contrastive head has a negative bank"),
        (["contrastive", "fashion_cnn", "--epochs", "0"], "epochs: expected >= 1, got 0"),
        (["rotation", "fashion_cnn", "--checkpoint", "/nonexistent/w.pt"], "checkpoint not found: /nonexistent/w.pt"),
    ],
)
def test_equi_train_head_bad_input_is_one_line(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["train-head", *args])
    text = " ".join(((result.stderr or "") + (result.stdout or "")).split())
    assert result.exit_code == 2 and message in text, text


@pytest.mark.skipif(not _has("fashion_scenes", split="test"), reason="Fashion scenes missing: scripts/prepare_data.py")
@pytest.mark.parametrize("model, task", [("drn_tiny_seg", "segmentation"), ("maskrcnn_small", "instance")])
def test_train_head_works_for_segmentation_and_instance_models(tmp_path: Path, model: str, task: str) -> None:
    """Random-init backbones (``--checkpoint none``), tiny limits: the heads train, and the defenses accept them on the
    same seeded model a run config with ``checkpoint: none`` builds."""
    from training.heads import build_backbone, train_head

    for kind in SELF_SUPERVISED:
        card = train_head(
            kind,
            model,
            out=tmp_path,
            checkpoint="none",
            limit=6,
            eval_limit=2,
            epochs=1,
            bank_size=4 if kind == "contrastive" else None,
            log=lambda _m: None,
        )
        assert card["head"]["task"] == task and card["held_out"]["split"] == "test"
    net, _ = build_backbone(model, "none", 0)
    adapter = build_adapter(task, net)
    adapter.model_name = model
    ds = DATASETS.build("fashion_scenes_instances" if task == "instance" else "fashion_scenes", split="test")
    x = ds[0].image.unsqueeze(0)
    for kind in SELF_SUPERVISED:
        d = build_defense(kind, head=str(tmp_path / f"{model}.{kind}.pt"), steps=1, eps_v=8.0)
        out = d.purify(adapter, x, [5])
        assert float((out - x).abs().max()) <= 8 / 255 + 1e-6
