"""Shared pieces of the pipeline tests: a tiny real config (advertorch's clean LeNet5 on the 20 real MNIST test
digits from tests/fixtures) and table comparison."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

FIXTURE_DIGITS = Path(__file__).parent / "fixtures" / "mnist_foolbox"
REPO = Path(__file__).resolve().parent.parent
COMPARED = ("attack", "defense", "metric", "value", "n_samples")
# The environment variables the paper presets (configs/paper) read their dataset roots and checkpoints from.
PRESET_VARS = (
    "CITYSCAPES_ROOT",
    "DRN_D_22_CHECKPOINT",
    "VOC_ROOT",
    "DEEPLABV3_VOC_CHECKPOINT",
    "COCO_ROOT",
    "DEEPLABV3_COCO_CHECKPOINT",
    "IMAGENET_ROOT",
    "RESNET50_ADV_CHECKPOINT",
    "MASKRCNN_COCO_CHECKPOINT",
)
# A bad input is refused before any work starts, so it fails fast (README, "Bad-input catalogue").
BAD_INPUT_SECONDS = 10.0


def timed_call(call: Callable[[], T], hang_s: int = 60) -> tuple[T, float]:
    """``call()``'s result and its wall time in seconds. A call still running after ``hang_s`` raises TimeoutError
    (SIGALRM, so from the main thread only): a hang fails its test instead of stalling the suite."""

    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {hang_s} s: a bad input hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(hang_s)
    try:
        started = time.perf_counter()
        result = call()
        return result, time.perf_counter() - started
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def mnist_root(tmp: Path) -> Path:
    root = tmp / "mnist"
    (root / "test").mkdir(parents=True, exist_ok=True)
    for png in FIXTURE_DIGITS.glob("mnist_*.png"):
        shutil.copy(png, root / "test" / png.name)
    return root


def tiny_config(tmp: Path, *, shard_size: int = 5, batch_size: int = 5, name: str = "tiny", **over: Any) -> dict:
    cfg = {
        "name": name,
        "dataset": {"name": "mnist", "params": {"root": str(mnist_root(tmp)), "split": "test"}},
        "model": {"name": "lenet5_mnist_clean", "adapter": {"feature_layer": "relu2"}},
        "attacks": [{"name": "clean"}, {"name": "pgd", "eps": 48, "step_size": 16, "steps": 3}],
        "defenses": [
            {"name": "vanilla"},
            {"name": "equivariance", "steps": 2, "views": ["hflip", {"name": "resize", "scale": [0.75, 1.25]}]},
        ],
        "measure": {"views": ["hflip"]},
        "shard_size": shard_size,
        "batch_size": batch_size,
        "seed": 3,
        "cache_dir": str(tmp / "cache"),
        "results_dir": str(tmp / "results"),
        "retries": 1,
        "retry_delay_s": [0.0],
        "cluster": {"n_workers": 2},
    }
    cfg.update(over)
    return cfg


def write_config(tmp: Path, cfg: dict, filename: str = "run.yaml") -> Path:
    path = tmp / filename
    path.write_text(yaml.safe_dump(cfg))
    return path


def table_rows(results_dir: str | Path, run_id: str) -> list[tuple]:
    from storage import results as R

    rows = R.read_results_table(results_dir, run_id).to_pylist()
    return sorted(tuple(r[c] for c in COMPARED) for r in rows)


def write_same_shard(results_dir: str, writer: int, rounds: int) -> None:
    """One of several processes writing the same shard file at once (here, not in a test module: a spawned child
    imports this module, and the test modules import torch)."""
    import numpy as np

    from storage import results as R

    unit = {"attack_key": "a", "defense_key": "d", "shard": 0, "writer": writer}
    rows = [{"sample_id": f"s{i}", "correct": float(i % 2)} for i in range(50)]
    for _ in range(rounds):
        R.discard_shard(R.shard_path(results_dir, "race", "a", "d", 0))  # force a fresh write each round
        R.write_shard(results_dir, "race", unit, rows, {"n": np.arange(5)})


def kill_the_holder(
    fault_dir: Path, point: str = "defend", shard: int = 1, wait_s: float = 240
) -> tuple[threading.Thread, list[int]]:
    """Start a thread that SIGKILLs the process parked at fault point ``point:shard:...:hold`` (its pid file appears
    in ``fault_dir``). Returns the thread and the list the killed pid is appended to."""
    killed: list[int] = []

    def kill() -> None:
        pid_file = fault_dir / f"hold-{point}-{shard}.pid"
        deadline = time.monotonic() + wait_s
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_file.exists():
            killed.append(int(pid_file.read_text()))
            os.kill(killed[0], signal.SIGKILL)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread, killed


def has_backgrounds() -> bool:
    """The built-in scenes' background photos are prepared (scripts/prepare_data.py)."""
    from equicore.datasets import scenes
    from equicore.errors import DatasetError

    try:
        scenes.background_dir()
    except DatasetError:
        return False
    return True
