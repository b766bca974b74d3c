"""Every shipped config validates: demo and benchmark configs as they are, paper presets with their paths set."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import ConfigError, load_config
from tests.pipeline_helpers import PRESET_VARS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(
    "path",
    sorted((CONFIGS / "demo").glob("*.yaml"))
    + sorted((CONFIGS / "benchmark").glob("*.yaml"))
    + sorted((CONFIGS / "experiments").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_shipped_configs_validate(path: Path):
    cfg = load_config(path)
    assert cfg.run_id().startswith(cfg.name)


@pytest.mark.parametrize("path", sorted((CONFIGS / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_paper_presets_need_their_paths_and_validate_with_them(path: Path, monkeypatch, tmp_path):
    for var in PRESET_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="environment variables? .* not set") as err:
        load_config(path)
    needed = [var for var in PRESET_VARS if f"${{{var}}}" in path.read_text()]
    assert needed and all(var in str(err.value) for var in needed)  # every missing variable named at once
    for var in PRESET_VARS:
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    cfg = load_config(path)
    attack_eps = {a.eps for a in cfg.attacks if a.name != "clean"}
    assert attack_eps == {4.0}  # the paper's Linf budget
