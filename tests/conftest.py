"""Shared fixtures: tiny classification and segmentation models (random and trained), task setups, seeds.

Tests run on one intra-op thread by default (``EQUIROBUST_TEST_THREADS`` overrides): the CI and dev machines
have 2 shared cores, and oversubscribed OpenMP threads make small-tensor work ~10x slower. No assertion depends
on the thread count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch

import equicore  # noqa: F401  (registers every built-in entry)
from equicore.adapters import SegmentationAdapter
from tests.models_for_tests import (
    SCENE_CLASSES,
    SELF_SUPERVISED,
    TASKS,
    TaskSetup,
    make_scenes,
    make_task,
    tiny_head,
    train_scene_segmenter,
)

torch.set_num_threads(int(os.environ.get("EQUIROBUST_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _global_seed() -> None:
    """Code under test must never read the global RNG for its results; seeding it anyway keeps any test-side draw
    reproducible."""
    torch.manual_seed(0)


@pytest.fixture
def seeds() -> list[int]:
    return [101, 202, 303, 404, 505]


@pytest.fixture
def task_factory() -> Callable[..., TaskSetup]:
    return make_task


@pytest.fixture(params=TASKS)
def task_setup(request: pytest.FixtureRequest) -> TaskSetup:
    """A random tiny model of each task, with images and labels."""
    return make_task(request.param)


@pytest.fixture(scope="session")
def selfsup_heads(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], str]:
    """(defense name, task) -> a head file for ``make_task``'s model of that task, so the contract tests that run
    every registered defense can run the self-supervised ones (which need a trained head)."""
    folder = tmp_path_factory.mktemp("heads")
    return {
        (kind, task): str(tiny_head(kind, task, folder / f"tiny_{task}.{kind}.pt"))
        for kind in SELF_SUPERVISED
        for task in TASKS
    }


@dataclass
class TrainedSegmentation:
    model: torch.nn.Module
    adapter: SegmentationAdapter
    x: torch.Tensor  # held-out scenes
    y: torch.Tensor


@pytest.fixture(scope="session")
def trained_segmenter() -> TrainedSegmentation:
    """A TinySegmenter trained for a few seconds on synthetic disc/square scenes (32x32), with held-out scenes."""
    model = train_scene_segmenter(seed=0)
    x, y = make_scenes(24, 32, seed=123)
    return TrainedSegmentation(model, SegmentationAdapter(model, num_classes=SCENE_CLASSES), x, y)


@pytest.fixture(scope="session")
def pipeline_reference(tmp_path_factory: pytest.TempPathFactory) -> list[tuple]:
    """The tiny pipeline config (tests/pipeline_helpers.py) evaluated in process (no Prefect, no Dask): the table
    every disturbed run (retries, kills, corruption, a full disk, concurrent runs) must reproduce exactly."""
    from flows import pipeline
    from tasks.config import parse_config
    from tests.pipeline_helpers import table_rows, tiny_config

    tmp = tmp_path_factory.mktemp("reference")
    cfg = parse_config(tiny_config(tmp, cluster={"in_process": True, "torch_threads": 1}))
    summary = pipeline.run(cfg)
    assert summary.ok and summary.computed == 2 * 2 * 4
    return table_rows(cfg.results_dir, cfg.run_id())


# ---------------------------------------------------------------------------------------------- run start-up
@pytest.fixture
def phases() -> Iterator[list[str]]:
    """The start-up phases a run announces (flows.progress)."""
    from flows import progress

    seen: list[str] = []
    progress.PHASE[0] = seen.append
    try:
        yield seen
    finally:
        progress.PHASE[0] = None


@pytest.fixture
def no_configured_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Prefect API configured outside the test: a run chooses its API by itself."""
    from flows.prefect_api import configured_api_url

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    if configured_api_url():
        pytest.skip("the active Prefect profile names a server: every run would use it")
