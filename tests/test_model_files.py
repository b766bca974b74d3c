"""Whole-model files and factory models through the pipeline (issue #17): one small classifier given three ways (a
factory with a state_dict, a ``torch.export`` program, a TorchScript archive) scores every image identically; a
``.pt2``'s layers keep their names and can be hooked for the equivariance defense, and gradients reach the input;
the factory's code (and its plugins) is in the cache keys, so an edit recomputes instead of reusing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from equicore.models.user import import_module_file, load_model_file
from flows import pipeline
from storage import results as R
from tasks.code_identity import model_code
from tasks.config import load_config, parse_config
from tasks.runtime import build_runtime
from tasks.units import plan_units
from tests.pipeline_helpers import write_config

MODULE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def build(num_classes: int = 2) -> nn.Module:
    return Net(num_classes)
"""


def _images(root: Path) -> None:
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("model_files")
    _images(tmp / "images")
    (tmp / "my_net.py").write_text(MODULE)
    torch.manual_seed(0)
    net = import_module_file("my_net", tmp / "my_net.py").build().eval()  # the class the files are made from
    torch.save(net.state_dict(), tmp / "net.pt")
    dims = {0: torch.export.Dim("b"), 2: torch.export.Dim("h", min=4), 3: torch.export.Dim("w", min=4)}
    torch.export.save(torch.export.export(net, (torch.rand(2, 3, 16, 16),), dynamic_shapes=(dims,)), tmp / "net.pt2")
    torch.jit.script(net).save(str(tmp / "net.ts"))
    return tmp


def _config(tmp: Path, model: dict, name: str) -> dict:
    return {
        "name": name,
        "dataset": {"name": "image_folder", "params": {"root": str(tmp / "images")}},
        "model": {"task": "classification", "num_classes": 2, **model},
        "attacks": [{"name": "clean"}, {"name": "fgsm", "eps": 8}],
        "defenses": [{"name": "vanilla"}, {"name": "equivariance", "steps": 1, "views": ["hflip"]}],
        "measure": {"views": ["hflip"]},
        "shard_size": 3,
        "batch_size": 3,
        "cache_dir": str(tmp / "cache"),
        "results_dir": str(tmp / "results"),
        "cluster": {"in_process": True},
    }


def _rows(tmp: Path, run_id: str) -> list[tuple]:
    rows = R.read_results_table(tmp / "results", run_id).to_pylist()
    return sorted((r["attack"], r["defense"], r["metric"], round(r["value"], 6)) for r in rows)


def test_a_pt2_keeps_its_layers_hookable_and_differentiable(files: Path) -> None:
    model, kind = load_model_file(files / "net.pt2")
    assert kind == "export" and "body.0" in dict(model.named_modules())
    seen = []
    dict(model.named_modules())["body.1"].register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    x = torch.rand(1, 3, 20, 12, requires_grad=True)  # another batch and image size than exported with
    model(x).sum().backward()
    assert seen == [torch.Size([1, 4, 20, 12])] and x.grad is not None and x.grad.abs().sum() > 0
    script, kind = load_model_file(files / "net.ts")
    assert kind == "torchscript" and isinstance(script, torch.jit.ScriptModule)


def test_factory_pt2_and_torchscript_give_the_same_results(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(files)
    ways = {
        "factory": {"factory": "my_net:build", "checkpoint": str(files / "net.pt"), "feature_layer": "body.1"},
        "export": {"file": str(files / "net.pt2"), "feature_layer": "body.1"},
    }
    tables = {}
    for way, model in ways.items():
        summary = pipeline.run(load_config(write_config(files, _config(files, model, way), f"{way}.yaml")))
        assert summary.ok and summary.n_samples == 6
        tables[way] = _rows(files, summary.run_id)
    assert tables["factory"] == tables["export"]
    # TorchScript takes no feature layer: against the factory model with logits as features.
    logits = {"factory": {**ways["factory"], "feature_layer": "logits"}, "torchscript": {"file": str(files / "net.ts")}}
    for way, model in logits.items():
        summary = pipeline.run(load_config(write_config(files, _config(files, model, f"{way}-l"), f"{way}-l.yaml")))
        tables[way] = _rows(files, summary.run_id)
    assert tables["factory"] == tables["torchscript"]  # the same model, the logits as features in both


def test_editing_the_factory_or_a_plugin_changes_the_keys(files: Path, tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "my_net.py").write_text(MODULE)
    (tmp_path / "lib" / "helper.py").write_text("SCALE = 1\n")
    cfg = _config(files, {"factory": "my_net:build"}, "keys") | {"plugins": ["lib"]}
    path = write_config(tmp_path, cfg)

    def keys() -> tuple[str, set[str]]:
        rt = build_runtime(load_config(path))
        units = plan_units(rt)
        return model_code(rt)["model"], {u.unit_key for u in units.pairs}

    first = keys()
    assert keys() == first  # nothing changed: the same keys
    (tmp_path / "lib" / "my_net.py").write_text(MODULE + "\n# an edit\n")
    second = keys()
    assert second[0] != first[0] and not second[1] & first[1]
    (tmp_path / "lib" / "helper.py").write_text("SCALE = 22\n")  # another size: a new file version
    third = keys()
    assert third[0] not in (first[0], second[0])
    assert load_config(path).run_id() == parse_config(cfg | {"plugins": [str(tmp_path / "lib")]}).run_id()


def test_a_factory_in_a_plugin_package_with_relative_imports(files: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "code" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text("from torch import nn\n\ndef body():\n    return nn.Conv2d(3, 2, 3, padding=1)\n")
    (pkg / "nets.py").write_text(
        "from torch import nn\nfrom .layers import body\n\n"
        "def build():\n    return nn.Sequential(body(), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
    )
    cfg = _config(files, {"factory": "mypkg.nets:build", "feature_layer": "0"}, "pkg") | {"plugins": ["code"]}
    loaded = load_config(write_config(tmp_path, cfg))
    assert loaded.plugins == [str(tmp_path / "code")]
    rt = build_runtime(loaded)
    assert rt.adapter.features(torch.rand(1, 3, 16, 16)).shape == (1, 2, 16, 16)
    moved = parse_config(cfg | {"plugins": [str(tmp_path / "code" / "mypkg")]})  # the package folder itself
    assert build_runtime(moved).model_digest == rt.model_digest
