"""``model.graph: optimized`` (equicore.models.inference_graph): every registered model computes the same outputs,
adapter features and input gradients within tolerance with BatchNorm folded and NHWC weights; hooks keep their
names; plain identities are unchanged and optimized ones differ everywhere a cached result is keyed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from equicore.adapters import build_adapter
from equicore.errors import CheckpointError
from equicore.models import inference_graph as G
from equicore.models.common import Normalize, resolve_checkpoint
from equicore.registry import MODELS
from tasks.code_identity import model_code
from tasks.config import load_config, parse_config
from tasks.config_errors import ConfigError
from tasks.config_model import GRAPHS
from tasks.runtime import build_runtime
from tasks.units import attack_identity, plan_units, resolved_defense
from tests.pipeline_helpers import REPO, tiny_config

# |optimized - plain| <= REL * max(1, max |plain|) for outputs and features: folding rounds once per layer in float32
# (observed <= 4e-6 relative on every registered model). The input gradient is compared as a whole (relative L2
# error): GRAD_REL for the shipped, trained models (observed <= 1e-6); RANDOM_GRAD_REL for the models tested at a
# random initialisation with random BatchNorm statistics, where deep ResNets put pre-activations next to ReLU kinks
# and a unit whose input rounds across 0 changes the gradient through its receptive field (observed up to 1e-3 for
# deeplabv3_resnet101 at 32 x 32; 1e-2 at 64 x 64).
REL = 1e-4
GRAD_REL = 1e-4
RANDOM_GRAD_REL = 2e-2
DEFAULT_SHAPE = (3, 32, 32)  # models registered without an input shape: small and fast


def _bn_statistics(model: nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters (a random-initialised BN folds to almost nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))


def _model(name: str) -> nn.Module:
    meta = MODELS.meta(name)
    if meta.get("weights"):
        try:
            checkpoint = resolve_checkpoint(name, None, "set model.checkpoint")
        except CheckpointError as exc:
            pytest.skip(f"{name}: {exc}")
        model = MODELS.build(name, checkpoint=checkpoint)
    else:  # no shipped weights: random initialisation with non-trivial BatchNorm statistics
        torch.manual_seed(0)
        model = MODELS.build(name)
        _bn_statistics(model, 0)
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _adapter_options(name: str) -> dict:
    meta = MODELS.meta(name)
    layers = meta.get("feature_layers") or ()
    if meta["task"] == "classification" and layers:
        return {"feature_layer": layers[len(layers) // 2]}
    return {}


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    tol = REL * max(1.0, float(b.abs().max()))
    diff = float((a - b).abs().max())
    assert diff <= tol, f"{what}: max |diff| {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_optimized_graph_matches_plain_outputs_features_and_gradients(name: str) -> None:
    plain = _model(name)
    meta = MODELS.meta(name)
    options = _adapter_options(name)
    keep = tuple(options.values())
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    n_norms = G.count_batchnorms(plain)
    optimized = G.build_graph(plain, "optimized", keep)
    assert G.count_batchnorms(plain) == n_norms and all(
        torch.equal(v, before[k]) for k, v in plain.state_dict().items()
    )
    assert G.count_batchnorms(optimized) == 0, f"{name}: BatchNorm left unfolded"
    assert [n for n, _ in optimized.named_modules()] == [n for n, _ in plain.named_modules()]  # hooks find names
    shape = meta.get("input_shape") or DEFAULT_SHAPE
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))
    num_classes = meta.get("num_classes")
    a_plain = build_adapter(meta["task"], plain, num_classes=num_classes, **options)
    a_opt = build_adapter(meta["task"], optimized, num_classes=num_classes, **options)
    with torch.no_grad():
        f_plain, f_opt = a_plain.forward(x), a_opt.forward(x)
    _close(f_opt.features, f_plain.features, f"{name} features")
    _close(f_opt.logits, f_plain.logits, f"{name} logits")
    if meta["task"] != "instance":
        with torch.no_grad():
            _close(optimized(x), plain(x), f"{name} output")

    w = torch.randn(f_plain.features.shape, generator=torch.Generator().manual_seed(2))

    def grad(adapter) -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((adapter.features(xr) * w).sum(), xr)
        return g

    g_plain, g_opt = grad(a_plain), grad(a_opt)
    rel = float((g_opt - g_plain).norm() / g_plain.norm().clamp_min(1e-12))
    limit = GRAD_REL if meta.get("weights") else RANDOM_GRAD_REL
    assert rel <= limit, f"{name}: input gradient relative error {rel:.3g} > {limit:g}"


def test_maskrcnn_small_predictions_and_training_loss_survive_folding() -> None:
    plain = _model("maskrcnn_small")
    optimized = G.build_graph(plain, "optimized")
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    a_plain, a_opt = (
        build_adapter("instance", plain, num_classes=11),
        build_adapter("instance", optimized, num_classes=11),
    )
    p, o = a_plain.predict(x)[0], a_opt.predict(x)[0]
    assert p["labels"].tolist() == o["labels"].tolist()
    _close(o["boxes"], p["boxes"], "boxes")
    _close(o["scores"], p["scores"], "scores")
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([3]), "image_id": 7}
    target["masks"] = torch.zeros(1, 96, 96, dtype=torch.uint8)
    target["masks"][0, 10:50, 10:40] = 1
    _close(a_opt.task_loss(x, [target]), a_plain.task_loss(x, [target]), "training loss")


# ---------------------------------------------------------------------------------------------- the pure function
class _Untraceable(nn.Module):
    """A top-level forward fx cannot trace (data-dependent branch) around a Sequential pair and a direct pair."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize((0.5,), (0.25,))
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(self.normalize(x))
        if y.sum() > 0:  # fx cannot trace this
            y = y + 1
        return self.bn(self.conv(y))


class _Branching(nn.Module):
    """conv1's output feeds its BN and a skip connection: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return self.bn2(self.conv2(self.bn1(y))) + y


def _prepared(model: nn.Module) -> nn.Module:
    _bn_statistics(model, 5)
    return model.eval()


def test_untraceable_model_folds_its_sequential_pairs_and_never_fails() -> None:
    model = _prepared(_Untraceable())
    out, pairs = G.optimize_for_inference(model)
    assert pairs == [G.FoldedPair("stem.0", "stem.1")]  # the top-level pair runs in untraceable code: left alone
    assert isinstance(out.stem[1], nn.Identity) and isinstance(out.bn, nn.BatchNorm2d)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        _close(out(x), model(x), "untraceable model")


def test_shared_outputs_shared_modules_training_mode_and_kept_names_are_not_folded() -> None:
    model = _prepared(_Branching())
    assert G.foldable_pairs(model) == [G.FoldedPair("conv2", "bn2")]
    assert G.foldable_pairs(model, keep=("conv2",)) == []
    model.bn2.train()
    assert G.foldable_pairs(model) == []
    shared = nn.Conv2d(4, 4, 1)
    twice = _prepared(nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), shared, nn.BatchNorm2d(4), shared))
    assert G.foldable_pairs(twice) == [G.FoldedPair("0", "1")]


def test_feature_hooks_see_the_same_values_on_bn_and_kept_conv_names() -> None:
    plain = _model("fashion_cnn")
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    for layer in ("features.block1.bn1", "features.block2.conv2", "features.block2"):
        optimized = G.build_graph(plain, "optimized", keep=(layer,))
        ref = build_adapter("classification", plain, num_classes=10, feature_layer=layer).features(x)
        got = build_adapter("classification", optimized, num_classes=10, feature_layer=layer).features(x)
        _close(got, ref, layer)
    kept = G.build_graph(plain, "optimized", keep=("features.block2.conv2",))
    assert isinstance(kept.get_submodule("features.block2.bn2"), nn.BatchNorm2d)  # the hooked conv keeps its BN
    assert G.count_batchnorms(kept) == 1


def test_graph_values_agree_between_config_and_engine() -> None:
    assert tuple(GRAPHS) == G.GRAPHS
    with pytest.raises(Exception, match="model.graph: expected one of plain, optimized, got 'fast'"):
        G.build_graph(nn.Linear(1, 1), "fast")


# ---------------------------------------------------------------------------------------------- identities
# The run id of configs/demo/01_fashion_cnn.yaml before model.graph existed (README quotes it too).
DEMO_FASHION_RUN_ID = "demo-fashion-cnn-9f0b5dab17"


def test_plain_keeps_run_ids_and_optimized_changes_them() -> None:
    path = REPO / "configs" / "demo" / "01_fashion_cnn.yaml"
    plain, explicit = load_config(path), load_config(path, sets=["model.graph=plain"])
    optimized = load_config(path, sets=["model.graph=optimized"])
    assert plain.run_id() == explicit.run_id() == DEMO_FASHION_RUN_ID
    assert "graph" not in plain.semantic_dict()["model"] and plain.model.identity() == {}
    assert optimized.run_id() != DEMO_FASHION_RUN_ID and optimized.model.identity() == {"graph": "optimized"}


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"name": "lenet5_mnist_clean", "graph": "fast"}, "model.graph: expected one of plain, optimized, got 'fast'"),
        ({"name": "lenet5_mnist_clean", "graph": True}, "model.graph: expected one of plain, optimized, got True"),
        (
            {"file": "m.pt2", "task": "classification", "graph": "optimized"},
            "model: graph: optimized is for built-in and factory models; a model file runs as it was exported",
        ),
    ],
)
def test_bad_graph_values_are_one_line(tmp_path: Path, model: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**tiny_config(tmp_path), "model": model})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_attack_defense_and_unit_keys_differ_only_for_optimized(tmp_path: Path) -> None:
    base = tiny_config(tmp_path, cluster={"in_process": True})
    base["model"] = {"name": "lenet5_mnist_adv", "feature_layer": "relu2"}
    base["defenses"].append({"name": "rotation", "steps": 1})
    rts = {
        g: build_runtime(parse_config({**base, "model": {**base["model"], **({"graph": g} if g else {})}}))
        for g in (None, "plain", "optimized")
    }
    units = {g: plan_units(rt) for g, rt in rts.items()}
    keys = {g: [p.unit_key for p in u.pairs] + [s.attack_key for s in u.images] for g, u in units.items()}
    assert keys[None] == keys["plain"]
    assert not set(keys["optimized"]) & set(keys["plain"])  # every attack, defense and clean unit key differs
    attack = rts["plain"].cfg.attacks[1]
    assert "graph" not in attack_identity(rts["plain"], attack)["model"] and "graph" not in model_code(rts["plain"])
    assert attack_identity(rts["optimized"], attack)["model"]["graph"] == "optimized"
    assert "graph" in model_code(rts["optimized"])
    assert rts["optimized"].model_digest == rts["plain"].model_digest  # the weights' digest, not the folded copy's
    # The shipped rotation head (trained on the plain weights) is accepted by the optimised copy.
    rt = rts["optimized"]
    x, _, _ = rt.batch(rt.indices[:2])
    spec = resolved_defense(rt, attack, rt.cfg.defenses[2])
    assert spec.purify(rt.adapter, x, [0, 1]).shape == x.shape


FACTORY_WITH_BATCHNORM = """
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 10, 3, padding=1), nn.BatchNorm2d(10), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
"""


def test_a_factory_model_is_optimized_like_a_built_in_one(tmp_path: Path) -> None:
    (tmp_path / "bn_models.py").write_text(FACTORY_WITH_BATCHNORM)
    base = tiny_config(tmp_path, cluster={"in_process": True})
    model = {"factory": "bn_models:build", "task": "classification", "feature_layer": "3"}
    rts = {
        g: build_runtime(
            parse_config({**base, "model": {**model, "graph": g}, "plugins": [str(tmp_path / "bn_models.py")]})
        )
        for g in GRAPHS
    }
    assert G.count_batchnorms(rts["plain"].model) == 2
    assert G.count_batchnorms(rts["optimized"].model) == 1  # conv "3" is the hooked feature layer: its BN stays
    x, _, _ = rts["plain"].batch(rts["plain"].indices[:4])
    with torch.no_grad():
        p, o = rts["plain"].adapter.forward(x), rts["optimized"].adapter.forward(x)
    _close(o.features, p.features, "factory features")
    _close(o.logits, p.logits, "factory logits")
