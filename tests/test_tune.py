"""``equi tune`` and the validation splits: the search writes its front, plot and a preset that validates; a re-run
skips finished candidates; tuning never reads the test split (poisoned test files change nothing, and no test file
is opened); bad search configs fail in one line naming the field, exit 2, nothing written."""

from __future__ import annotations

import copy
import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from equicore.datasets import fashion_mnist, mnist, scenes
from equicore.datasets.base import collate
from tasks.config import load_config
from tasks.config_errors import ConfigError
from tasks.tune_config import parse_tune_config
from tasks.tune_front import choose, feasible, pareto_front, rank
from tests.pipeline_helpers import has_backgrounds

FM_DIR = fashion_mnist.FASHION_MNIST_DIR


needs_fashion = pytest.mark.skipif(
    not all(f.is_file() for s in ("train", "test") for f in fashion_mnist.idx_files(FM_DIR, s)),
    reason=f"Fashion-MNIST missing at {FM_DIR}: run `python scripts/prepare_data.py`",
)
needs_scenes = pytest.mark.skipif(
    not all(f.is_file() for s in ("train", "test") for f in fashion_mnist.idx_files(FM_DIR, s))
    or not has_backgrounds(),
    reason="Fashion scenes need Fashion-MNIST and the scikit-image photos: run `python scripts/prepare_data.py`",
)
COMPARED = ("candidate", "label", "clean", "robust_screen", "robust_confirmed", "on_front", "feasible", "chosen")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def fashion_root(tmp: Path, *, poisoned: bool) -> Path:
    """The real train files (symlinks); the test files real, or random images with random labels."""
    root = tmp / ("poisoned" if poisoned else "clean")
    root.mkdir()
    for split in ("train", "test"):
        for f in fashion_mnist.idx_files(FM_DIR, split):
            (root / f.name).symlink_to(f)
    if poisoned:
        images, labels = fashion_mnist.idx_files(root, "test")
        rng = np.random.default_rng(0)
        for f in (images, labels):
            f.unlink()
        write_idx(images, rng.integers(0, 256, (10000, 28, 28)))
        write_idx(labels, rng.integers(0, 10, 10000))
    return root


def tune_data(tmp: Path, root: Path, **search: Any) -> dict[str, Any]:
    return {
        "name": "tiny-tune",
        "dataset": {"name": "fashion_mnist", "params": {"root": str(root), "split": "test"}},
        "model": {"name": "fashion_cnn"},
        "attacks": [{"name": "clean"}, {"name": "pgd", "eps": 8, "steps": 2, "step_size": 4}],
        "defenses": [{"name": "vanilla"}, {"name": "equivariance", "steps": 2, "eval_draws": 1}],
        "shard_size": 6,
        "batch_size": 6,
        "cache_dir": str(tmp / "cache"),
        "results_dir": str(tmp / "results"),
        "cluster": {"in_process": True, "torch_threads": 1},
        "search": {
            "defense": 1,
            "space": {"eps_v": [6, 16]},
            "validation": {"limit": 6},
            "screen_attack": {"name": "pgd", "eps": 8, "steps": 2, "step_size": 4},
            "confirm_attacks": [{"name": "bpda", "eps": 8, "steps": 2, "eot": 1}, {"name": "aa", "eps": 8, "steps": 2}],
            "confirm_top": 1,
            **search,
        },
    }


def compared(rows: list[dict[str, Any]]) -> list[tuple]:
    return [tuple(r[c] for c in COMPARED) for r in rows]


@pytest.fixture(scope="module")
def clean_search(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from flows.tune import tune

    if not FM_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST missing at {FM_DIR}")
    tmp = tmp_path_factory.mktemp("tune")
    spec = parse_tune_config(tune_data(tmp, fashion_root(tmp, poisoned=False)))
    return {"tmp": tmp, "spec": spec, "result": tune(spec, log=lambda _: None)}


# -------------------------------------------------------------------------------------------------- the search
@needs_fashion
def test_search_writes_front_plot_and_a_preset_that_validates(clean_search) -> None:
    spec, result = clean_search["spec"], clean_search["result"]
    assert [c.label for c in spec.candidates] == ["baseline (as configured)", "eps_v=6", "eps_v=16"]
    rows = pq.read_table(result.front_path).to_pylist()
    assert [r["candidate"] for r in rows] == [0, 1, 2] and all(r["split"] == "val" for r in rows)
    assert all(r["n_samples"] == 6 for r in rows)
    assert [r["on_front"] for r in rows] == pareto_front([(r["clean"], r["robust_screen"]) for r in rows])
    assert sum(r["chosen"] for r in rows) == 1
    # Confirmed: the best feasible screened point and the baseline, with the per-image worst of the strong attacks.
    confirmed = [r["candidate"] for r in rows if r["robust_confirmed"] is not None]
    assert sorted(confirmed) == sorted({rank(rows)[0], 0})
    assert all(r["robust_confirmed"] <= r["clean"] for r in rows if r["robust_confirmed"] is not None)
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["candidate"] == choose(rows, "robust_confirmed") == result.chosen.number
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The preset: the base config (test split) with the chosen defense settings; it validates as a run config.
    preset = load_config(result.preset_path)
    assert preset.name == "tiny-tune-tuned" and preset.dataset.params["split"] == "test"
    assert [a.name for a in preset.attacks] == ["clean", "pgd"]
    tuned = preset.defenses[1]
    assert {"name": tuned.name, **tuned.params(), "eval_draws": tuned.eval_draws} == result.chosen.defense
    assert preset.defenses[0].name == "vanilla"
    assert result.cost.runs == 5 and result.cost.shards_computed > 0 and result.cost.image_passes > 0


@needs_fashion
def test_a_second_search_skips_every_finished_candidate(clean_search) -> None:
    from flows.tune import tune

    first = clean_search["result"]
    again = tune(clean_search["spec"], log=lambda _: None)
    assert again.cost.shards_computed == 0 and again.cost.image_passes == 0
    assert again.cost.shards_skipped == first.cost.shards_computed
    assert compared(again.rows) == compared(first.rows) and again.chosen == first.chosen


@needs_fashion
def test_tuning_never_reads_the_test_split(clean_search, tmp_path, monkeypatch) -> None:
    """Poisoned test files (random images, random labels) give the same front and preset, and no test file is
    opened at all."""
    from flows.tune import tune

    opened: list[str] = []
    real_read_idx = fashion_mnist.read_idx
    monkeypatch.setattr(fashion_mnist, "read_idx", lambda p: opened.append(Path(p).name) or real_read_idx(p))
    # The poisoned root is a fresh path, so none of its splits is in the loader's per-process cache: every idx
    # file the search reads goes through read_idx (and `opened` below is not empty).
    spec = parse_tune_config(tune_data(tmp_path, fashion_root(tmp_path, poisoned=True)))
    result = tune(spec, log=lambda _: None)
    assert opened and not [n for n in opened if n.startswith("t10k")]
    assert compared(result.rows) == compared(clean_search["result"].rows)
    poisoned_preset = yaml.safe_load(result.preset_path.read_text())
    clean_preset = yaml.safe_load(clean_search["result"].preset_path.read_text())
    assert poisoned_preset["defenses"] == clean_preset["defenses"]


@needs_fashion
def test_a_candidate_run_with_failed_shards_stops_the_search_naming_it(clean_search) -> None:
    from flows.pipeline import RunSummary
    from flows.tune import TuneRunFailed, tune

    def failing(cfg):
        return RunSummary(cfg.run_id(), cfg.results_dir, 6, 1, 0, 0, [{"unit": "u", "shard": 0, "error": "boom"}])

    with pytest.raises(TuneRunFailed, match=r"tiny-tune-tune-screen-\w+: 1 shard\(s\) failed \(boom\)"):
        tune(clean_search["spec"], runner=failing, log=lambda _: None)


# --------------------------------------------------------------------------------------------------- bad input
def _edit(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node[p]
    if value is KeyError:
        node.pop(last)
    else:
        node[last] = value
    return out


BAD = [
    ("search.space.eps_v", [8, -2], "search.space.eps_v: -2 < 0; a budget cannot be negative"),
    ("search.space", {"etaa": [1]}, "search.space.etaa: not a tunable option (did you mean 'eta'?)"),
    ("search.space", {}, "search.space: empty"),
    ("search.space.eps_v", [], "search.space.eps_v: expected a non-empty list"),
    ("search.bogus", 1, "search.bogus: unknown key"),
    ("search.validation.split", "test", "search.validation.split: 'test' is the test split of this config"),
    ("search.defense", 0, "search.defense: defenses.0 (vanilla) does not optimise at test time"),
    ("search.defense", 5, "search.defense: 5 is past the end of defenses"),
    ("search.confirm_attacks", [], "search.confirm_attacks: empty, but confirm_top is 1"),
    (
        "search.space.step_rule",
        ["sgn"],
        "search.space: candidate eps_v=6, step_rule=sgn: defenses.0: equivariance.step_rule",
    ),
    ("search", KeyError, "no search: section"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_bad_search_configs_fail_naming_the_field(tmp_path, path, value, message) -> None:
    data = _edit(tune_data(tmp_path, tmp_path), path, value)
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: ") as err:
        parse_tune_config(data, "cfg.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_dataset_without_a_validation_split_is_refused(tmp_path) -> None:
    data = tune_data(tmp_path, tmp_path)
    data["dataset"] = {"name": "imagenet", "params": {"root": str(tmp_path)}}
    data["model"] = {"name": "resnet50"}
    with pytest.raises(ConfigError, match="dataset 'imagenet' declares no validation split"):
        parse_tune_config(data, "cfg.yaml")
    # Naming its ImageNet test split ('val', the paper's) explicitly is refused too.
    data["search"]["validation"] = {"split": "val"}
    with pytest.raises(ConfigError, match="'val' is the test split"):
        parse_tune_config(data, "cfg.yaml")


def test_cli_bad_search_is_one_line_exit_2_and_writes_nothing(tmp_path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(_edit(tune_data(tmp_path, tmp_path), "search.space.eps_v", [-1])))
    res = CliRunner().invoke(app, ["tune", str(path)])
    assert res.exit_code == 2
    assert "search.space.eps_v: -1 < 0" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------- the selection rule
def test_pareto_front_and_choice() -> None:
    points = [(0.9, 0.2), (0.85, 0.4), (0.8, 0.3), (0.7, 0.5), (0.85, 0.4)]
    assert pareto_front(points) == [True, True, False, True, True]
    rows = [
        {"candidate": i, "clean": c, "robust": r, "feasible": feasible(c, 0.9, 0.1)} for i, (c, r) in enumerate(points)
    ]
    assert [r["feasible"] for r in rows] == [True, True, True, False, True]
    assert rank(rows, "robust") == [1, 4, 2, 0]  # ties: higher clean, then the lower candidate number
    assert choose(rows, "robust") == 1
    rows[1]["robust"] = float("nan")  # not scored (not confirmed)
    assert choose(rows, "robust") == 4


# ------------------------------------------------------------------------------------------- validation splits
@needs_fashion
def test_fashion_mnist_val_is_a_fixed_tail_of_train_disjoint_from_test() -> None:
    val = fashion_mnist.fashion_mnist(split="val")
    lo, hi = fashion_mnist.VAL_RANGE
    train_tail = fashion_mnist.fashion_mnist(split="train", indices=range(lo, hi))
    assert len(val) == hi - lo and val.sample_id(0) == f"val/{lo:06d}" and "TRAIN" in val.split_note
    # Sample by sample (images, labels), the val split is the train split's tail; only the ids' prefix differs.
    val_images, val_labels, val_ids = collate(list(val))
    tail_images, tail_labels, tail_ids = collate(list(train_tail))
    assert torch.equal(val_images, tail_images) and torch.equal(val_labels, tail_labels)
    assert val_ids == [i.replace("train/", "val/") for i in tail_ids]
    assert val.fingerprint() != fashion_mnist.fashion_mnist(split="test").fingerprint()
    assert len(fashion_mnist.fashion_mnist(split="val", limit=4)) == 4


def test_mnist_val_is_a_fixed_tail_of_the_train_digits(tmp_path) -> None:
    rng = np.random.default_rng(0)
    table = np.concatenate([rng.integers(0, 256, (5000, 784)), rng.integers(0, 10, (5000, 1))], axis=1)
    (tmp_path / "train").mkdir()
    with gzip.open(tmp_path / "train" / mnist.MNIST_CSV, "wt") as fh:
        np.savetxt(fh, table, fmt="%d", delimiter=",")
    val = mnist.mnist(root=str(tmp_path), split="val", limit=3)
    assert [val.sample_id(i) for i in range(3)] == ["val/004000", "val/004001", "val/004002"]
    assert [val[i].target for i in range(3)] == table[4000:4003, -1].tolist()
    assert all(np.array_equal(val[i].image.mul(255).round().flatten().numpy(), table[4000 + i, :-1]) for i in range(3))


@needs_scenes
def test_scene_val_split_uses_train_side_sources_only() -> None:
    val = scenes.fashion_scenes(split="val", num_scenes=3, cache=False)
    train = scenes.fashion_scenes(split="train", num_scenes=3, cache=False)
    assert len(scenes.fashion_scenes(split="val", cache=False)) == scenes.DEFAULT_NUM_SCENES["val"]
    assert val.source_split == train.source_split == "train"  # the train Fashion-MNIST files and the train photos
    for i in range(3):
        assert all(split == "train" for split, _, _ in val.scene_items(i))
        assert not np.array_equal(val.scene_arrays(i)[0], train.scene_arrays(i)[0])  # own scene generators
    assert val.fingerprint() not in (
        train.fingerprint(),
        scenes.fashion_scenes(split="test", cache=False).fingerprint(),
    )


def test_every_dataset_declares_its_test_split_and_a_distinct_validation_split() -> None:
    from equicore.registry import DATASETS

    for name in DATASETS.names():
        meta = DATASETS.meta(name)
        assert meta.get("test_split"), name
        assert meta.get("validation_split") != meta["test_split"], name
    builtin = {n for n in DATASETS.names() if DATASETS.meta(n).get("validation_split")}
    assert builtin == {"fashion_mnist", "mnist", "fashion_scenes", "fashion_scenes_instances"}


def test_grid_points_equal_to_the_baseline_are_not_run_twice(tmp_path) -> None:
    data = tune_data(tmp_path, tmp_path)
    data["search"]["space"] = {"step_rule": ["sign", "normalized"], "schedule": ["constant", "cosine"]}
    spec = parse_tune_config(data, "cfg.yaml")
    # (sign, constant) is Algorithm 1 as configured: the baseline, candidate 0.
    assert [c.label for c in spec.candidates] == [
        "baseline (as configured)",
        "step_rule=sign, schedule=cosine",
        "step_rule=normalized, schedule=constant",
        "step_rule=normalized, schedule=cosine",
    ]
    assert len({spec.screen_config(c).run_id() for c in spec.candidates}) == 4
    assert all(spec.screen_config(c).dataset.params["split"] == "val" for c in spec.candidates)
