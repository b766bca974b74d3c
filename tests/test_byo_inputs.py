"""Bad inputs of the "bring your own model and data" path (issue #17), as rows of the bad-input catalogue: each runs
``equi run`` through tests/test_hostile_config.py's check (exit 2, one line naming the problem, nothing written,
under 10 s) from a folder holding the user's files. Also: ``os:system`` as a factory imports nothing, a ``.pt2``
carrying a pickled shell command is refused without running it, and the user-model config fields in the run id.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tasks.config import ConfigError, load_config, parse_config
from tests import test_hostile_config as H
from tests.pipeline_helpers import REPO

TINY_MNIST_NET = """
import torch
from torch import nn


def build(num_classes: int = 10, shape: str = "logits"):
    if shape == "dict":
        return {"not": "a module"}
    conv = nn.Conv2d(1, num_classes, 3, padding=1)
    if shape == "dense":
        return conv  # B x K x H x W: a segmentation output, not a classifier's
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())
"""


def _model(tmp: Path, factory: str = "my_models:build", source: str = TINY_MNIST_NET, **model: Any) -> dict:
    (tmp / "my_models.py").write_text(source)
    return {"factory": factory, "task": "classification", **model}


def case(id: str, bad_input: str, build: Callable[[Path, dict], None], *expected: str) -> H.Case:
    """The tiny MNIST config with ``build(tmp, cfg)`` applied (it writes the user's files next to the config)."""

    def make(tmp: Path) -> list[str]:
        cfg = H.base_config(tmp)
        build(tmp, cfg)
        return ["run", str(H._write(tmp, yaml.safe_dump(cfg))), "-q"]

    return H.Case(id, bad_input, make, expected)


def _set_model(**model: Any) -> Callable[[Path, dict], None]:
    def build(tmp: Path, cfg: dict) -> None:
        source = model.pop("source", TINY_MNIST_NET)
        cfg["model"] = _model(tmp, source=source, **model)

    return build


def _image_folder(tmp: Path, cfg: dict) -> None:
    (tmp / "imgs" / "cat").mkdir(parents=True)
    (tmp / "imgs" / "cat" / "notes.txt").write_text("no images here")
    cfg["dataset"] = {"name": "image_folder", "params": {"root": str(tmp / "imgs")}}
    cfg["model"] = _model(tmp)


def _squares(tmp: Path, label: int = 1, mask_stem: str = "00") -> Path:
    root = tmp / "squares"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / "images" / "00.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = label
    Image.fromarray(mask, mode="L").save(root / "masks" / f"{mask_stem}.png")
    return root


def _segmentation(label: int = 1, mask_stem: str = "00") -> Callable[[Path, dict], None]:
    def build(tmp: Path, cfg: dict) -> None:
        root = _squares(tmp, label, mask_stem)
        cfg["dataset"] = {"name": "segmentation_folder", "params": {"root": str(root), "num_classes": 3}}
        cfg["model"] = _model(tmp, "seg:build", task="segmentation")
        (tmp / "seg.py").write_text("from torch import nn\n\ndef build():\n    return nn.Conv2d(3, 3, 1)\n")
        cfg["attacks"] = [{"name": "clean"}]

    return build


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 10, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def _static_pt2(tmp: Path, cfg: dict) -> None:
    program = torch.export.export(_Net().eval(), (torch.rand(1, 1, 28, 28),))
    torch.export.save(program, tmp / "static.pt2")
    cfg["model"] = {"file": str(tmp / "static.pt2"), "task": "classification"}


def _torchscript_layer(tmp: Path, cfg: dict) -> None:
    torch.jit.script(_Net().eval()).save(str(tmp / "net.ts"))
    cfg["model"] = {"file": str(tmp / "net.ts"), "task": "classification", "feature_layer": "conv"}


CASES = [
    case(
        "factory_not_an_identifier",
        "`model.factory: my-models.py` (not `module:function`)",
        _set_model(factory="my-models.py"),
        "model.factory: 'my-models.py' is not 'module:function'",
    ),
    case(
        "factory_os_system",
        "`model.factory: os:system` (an installed module, not the user's)",
        _set_model(factory="os:system"),
        "model.factory: module 'os' is neither next to the config",
        "never an installed package",
    ),
    case(
        "factory_plugin_missing",
        "a `plugins:` entry that does not exist",
        lambda t, c: (c.update(plugins=["lib/models.py"]), c.update(model=_model(t))),
        "plugins.0: ",
        "lib/models.py does not exist (paths are relative to the config file)",
    ),
    case(
        "name_and_factory",
        "`model.name` and `model.factory` together",
        lambda t, c: c["model"].update(factory="my_models:build"),
        "model: give exactly one of name (a built-in model), factory (module:function) or file",
        "got name and factory",
    ),
    case(
        "factory_without_task",
        "a factory model without `task`",
        lambda t, c: c.update(model={"factory": "my_models:build"}) or _model(t),
        "model: task: a factory model declares its task",
    ),
    case(
        "normalize_std_zero",
        "`normalize: {std: [0]}` (a division by zero)",
        _set_model(normalize={"mean": [0.5], "std": [0.0]}),
        "model.normalize: std must be > 0 for every channel, got [0.0]",
    ),
    case(
        "num_classes_bool",
        "`model.num_classes: true`",
        _set_model(num_classes=True),
        "model.num_classes: Input should be a valid integer, got true (a boolean)",
    ),
    case(
        "plugins_not_a_list",
        '`plugins: "my_models.py"` (a string, not a list)',
        lambda t, c: (c.update(model=_model(t)), c.update(plugins="my_models.py")),
        "plugins: Input should be a valid list",
    ),
    case(
        "model_file_with_checkpoint",
        "`model.file` with a `checkpoint` (a model file holds its weights)",
        lambda t, c: c.update(model={"file": "m.pt2", "checkpoint": "w.pt", "task": "classification"}),
        "model: checkpoint: a model file holds its weights",
    ),
    case(
        "factory_does_not_import",
        "a factory module that does not import",
        _set_model(source="import not_installed_anywhere\n"),
        "model.factory 'my_models:build': importing ",
        "my_models.py failed (ModuleNotFoundError: No module named 'not_installed_anywhere')",
    ),
    case(
        "factory_returns_non_module",
        "a factory that returns something other than an `nn.Module`",
        _set_model(params={"shape": "dict"}),
        "model.factory 'my_models:build' returned a dict, not a torch.nn.Module",
    ),
    case(
        "model_output_wrong_shape",
        "a model whose output does not fit the declared task (dense maps for classification)",
        _set_model(params={"shape": "dense"}),
        "model 'my_models:build': output shape [1, 10, 28, 28] does not fit a classification model",
    ),
    case(
        "model_output_wrong_classes",
        "a model with 3 outputs on a 10-class dataset",
        _set_model(params={"num_classes": 3}),
        "model 'my_models:build': outputs 3 classes but the dataset has 10",
    ),
    case(
        "model_num_classes_mismatch",
        "`model.num_classes: 5` on a 10-class dataset",
        _set_model(num_classes=5),
        "model.num_classes is 5 but dataset 'mnist' has 10 classes",
    ),
    case(
        "image_folder_without_images",
        "an `image_folder` whose class folders hold no images",
        _image_folder,
        "no images (.png, .jpg",
    ),
    case(
        "mask_label_above_classes",
        "a `segmentation_folder` mask with label 5 for 3 classes",
        _segmentation(label=5),
        "squares/masks/00.png: label value 5 out of range (expected 0..2 or 255)",
    ),
    case(
        "mask_stem_mismatch",
        "an image whose mask has another stem (`00.png` and `01.png`)",
        _segmentation(mask_stem="01"),
        "squares/images/00.png: no mask",
        "images and masks pair by file stem",
    ),
    case(
        "static_exported_program",
        "a `.pt2` exported with static shapes",
        _static_pt2,
        "model 'static.pt2': it does not accept a batch of 2",
        "export it with dynamic batch, height and width",
    ),
    case(
        "torchscript_feature_layer",
        "`feature_layer` on a TorchScript model",
        _torchscript_layer,
        "model.feature_layer 'conv': a TorchScript model cannot be hooked",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_user_model_or_data_fails_in_one_line_and_writes_nothing(
    case: H.Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    H.test_hostile_input_fails_in_one_line_and_writes_nothing(case, tmp_path, monkeypatch)


def test_every_case_is_in_the_readme_catalogue() -> None:
    readme = (REPO / "README.md").read_text()
    assert [c.id for c in CASES if f"`{c.id}`" not in readme] == []


# ---------------------------------------------------------------------------------------------- code never run
def test_os_system_as_a_factory_imports_nothing(tmp_path: Path) -> None:
    cfg = H.base_config(tmp_path)
    cfg["model"] = {"factory": "subprocess:getoutput", "task": "classification"}
    before = set(sys.modules)
    path = H._write(tmp_path, yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="module 'subprocess' is neither next to the config"):
        load_config(path)
    assert "subprocess" in before or "subprocess" not in sys.modules


class _Payload:
    def __reduce__(self):  # a pickle that runs a shell command when loaded without weights_only
        return (os.system, (f"touch {self.target}",))

    target = ""


def test_a_pt2_carrying_pickled_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    import zipfile

    from equicore.errors import CheckpointError
    from equicore.models.user import load_model_file

    program = torch.export.export(_Net().eval(), (torch.rand(2, 1, 28, 28),))
    good = tmp_path / "good.pt2"
    torch.export.save(program, good)
    _Payload.target = str(tmp_path / "pwned")
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("sample_inputs/model.pt"):
                buffer = __import__("io").BytesIO()
                torch.save(_Payload(), buffer)
                data = buffer.getvalue()
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pt2: entry .*sample_inputs/model\.pt"):
        load_model_file(evil)
    assert not (tmp_path / "pwned").exists()
    model, kind = load_model_file(good)
    assert kind == "export" and isinstance(model, torch.nn.Module)


# ---------------------------------------------------------------------------------------------- run ids
def test_user_model_fields_leave_built_in_run_ids_unchanged_and_identify_user_models(tmp_path: Path) -> None:
    cfg = H.base_config(tmp_path)
    before = parse_config(cfg)
    d = before.semantic_dict()
    assert set(d["model"]) == {"checkpoint", "params", "adapter", "name"} and "plugins" not in d
    spelled = {**cfg, "model": {"name": cfg["model"]["name"], "feature_layer": "relu2"}}
    assert parse_config(spelled).run_id() == before.run_id()  # feature_layer here or under adapter: one run id
    (tmp_path / "my_models.py").write_text(TINY_MNIST_NET)
    user = {**cfg, "model": _model(tmp_path), "plugins": [str(tmp_path / "my_models.py")]}
    assert parse_config(user).run_id() != before.run_id()
    with pytest.raises(ConfigError, match="plugins: 'rel.py' is relative"):
        parse_config({**user, "plugins": ["rel.py"]})
