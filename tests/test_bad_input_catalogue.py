"""The bad-input catalogue (README, "Troubleshooting"): one table of bad inputs, each asserting

- a one-line error (no traceback) that names the field, path or tensor and says what was expected, and
- that a run completed before it (same results and cache directories) is byte-identical afterwards, and
- that it fails in under 10 s (tests.pipeline_helpers.BAD_INPUT_SECONDS), like the hostile cases.

CLI cases run ``equi`` in process (typer's CliRunner) against the completed run's directories, so a bad config
that slipped through would write next to real results. Engine cases (tensors that never come from a config) call
the engine directly. Related, more detailed tests: tests/test_bad_input.py (engine), tests/test_cli.py,
tests/test_configs.py, tests/test_models.py (checkpoints), tests/test_datasets*.py (loaders),
tests/test_storage*.py (storage), tests/test_security.py (paths, code in configs).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

import equicore  # noqa: F401  (registrations)
from equicore.attacks import build_attack, run_attack
from equicore.errors import EquirobustError
from equicore.models.lenet import LeNet5
from flows import pipeline
from flows.cli import app
from storage import results as R
from storage.locks import run_lock
from tasks.config import parse_config
from tests.models_for_tests import TinyClassifier, make_task, seeded_model
from tests.pipeline_helpers import BAD_INPUT_SECONDS, FIXTURE_DIGITS, REPO, mnist_root, timed_call, tiny_config

IMAGENET_FIXTURE = REPO / "tests" / "fixtures" / "datasets" / "imagenet"
runner = CliRunner()


# ---------------------------------------------------------------------------------------------- the completed run
@dataclass(frozen=True)
class CompletedRun:
    cfg: dict[str, Any]
    run_id: str
    results_dir: Path
    cache_dir: Path


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> CompletedRun:
    tmp = tmp_path_factory.mktemp("completed")
    cfg = tiny_config(tmp, name="kept", cluster={"in_process": True, "torch_threads": 1})
    summary = pipeline.run(parse_config(cfg))
    assert summary.ok
    return CompletedRun(cfg, summary.run_id, Path(cfg["results_dir"]), Path(cfg["cache_dir"]))


def snapshot(run: CompletedRun) -> dict[str, str]:
    """sha256 of every file under the run's results and cache directories (lock files carry no results)."""
    out = {}
    for root in (run.results_dir, run.cache_dir):
        for p in sorted(root.rglob("*")):
            if p.is_file() and "locks" not in p.relative_to(root).parts:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------- how cases run
Outcome = tuple[int | None, str]  # (exit code, or None for an engine call; the error message)


def _cli(*args: str) -> Outcome:
    result = runner.invoke(app, list(args))
    text = (result.stderr or "") + (result.stdout or "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug, and the test should show it
    return result.exit_code, text


def _bad_config(tmp: Path, run: CompletedRun, mutate: Callable[[dict, Path], None]) -> Outcome:
    cfg = yaml.safe_load(yaml.safe_dump(run.cfg))  # a deep copy
    mutate(cfg, tmp)
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return _cli("run", str(path), "-q")


def _engine(call: Callable[[], Any]) -> Outcome:
    try:
        call()
    except EquirobustError as exc:
        return None, str(exc)
    raise AssertionError("no error raised")


@dataclass(frozen=True)
class Case:
    id: str
    bad_input: str  # as in the README table
    run: Callable[[Path, CompletedRun], Outcome]
    expected: tuple[str, ...]  # parts of the one-line message: what is named, and what was expected


def config(id: str, bad_input: str, mutate: Callable[[dict, Path], None], *expected: str) -> Case:
    return Case(id, bad_input, lambda tmp, run: _bad_config(tmp, run, mutate), expected)


def cli(id: str, bad_input: str, args: Callable[[Path, CompletedRun], list[str]], *expected: str) -> Case:
    return Case(id, bad_input, lambda tmp, run: _cli(*args(tmp, run)), expected)


def engine(id: str, bad_input: str, call: Callable[[], Any], *expected: str) -> Case:
    return Case(id, bad_input, lambda tmp, run: _engine(call), expected)


# ---------------------------------------------------------------------------------------------- input builders
def _yaml_file(tmp: Path, text: str) -> list[str]:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return ["run", str(path), "-q"]


def _set(*keys: str, value: Any) -> Callable[[dict, Path], None]:
    def mutate(cfg: dict, tmp: Path) -> None:
        d = cfg
        for k in keys[:-1]:
            d = d[int(k)] if isinstance(d, list) else d[k]
        d[int(keys[-1]) if isinstance(d, list) else keys[-1]] = value

    return mutate


def _mnist_copy(tmp: Path) -> Path:
    return mnist_root(tmp / "data")


def _undecodable_image(cfg: dict, tmp: Path) -> None:
    root = _mnist_copy(tmp)
    (root / "test" / "mnist_00_7.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg["dataset"]["params"]["root"] = str(root)


def _label_out_of_range(cfg: dict, tmp: Path) -> None:
    root = _mnist_copy(tmp)
    shutil.copy(root / "test" / "mnist_00_7.png", root / "test" / "mnist_99_12.png")
    cfg["dataset"]["params"]["root"] = str(root)


def _wrong_layout(cfg: dict, tmp: Path) -> None:
    (tmp / "flat").mkdir()
    for png in FIXTURE_DIGITS.glob("mnist_*.png"):
        shutil.copy(png, tmp / "flat" / png.name)  # digits directly in the root, not under test/
    cfg["dataset"]["params"]["root"] = str(tmp / "flat")


def _symlink_out_of_root(cfg: dict, tmp: Path) -> None:
    root = _mnist_copy(tmp)
    outside = tmp / "outside.png"
    shutil.copy(root / "test" / "mnist_00_7.png", outside)
    (root / "test" / "mnist_00_7.png").unlink()
    (root / "test" / "mnist_00_7.png").symlink_to(outside)
    cfg["dataset"]["params"]["root"] = str(root)


def _checkpoint(cfg: dict, tmp: Path, state: Any, name: str = "weights.pt") -> None:
    torch.save(state, tmp / name)
    cfg["model"]["checkpoint"] = str(tmp / name)


def _lenet_state(scale: float = 1.0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v * scale for k, v in LeNet5().state_dict().items()}


class _RunsCode:
    """A pickle payload that would create a file if unpickled with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _code_checkpoint(cfg: dict, tmp: Path) -> None:
    _checkpoint(cfg, tmp, {"conv1.weight": _RunsCode(tmp / "code-ran")})


def _truncated_checkpoint(cfg: dict, tmp: Path) -> None:
    _checkpoint(cfg, tmp, _lenet_state())
    data = (tmp / "weights.pt").read_bytes()
    (tmp / "weights.pt").write_bytes(data[: len(data) // 2])


def _nan_checkpoint(cfg: dict, tmp: Path) -> None:
    state = _lenet_state()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    _checkpoint(cfg, tmp, state)


def _wrong_class_count(cfg: dict, tmp: Path) -> None:
    cfg["dataset"] = {"name": "imagenet", "params": {"root": str(IMAGENET_FIXTURE)}}
    cfg["model"] = {"name": "resnet50", "checkpoint": "none", "adapter": {"feature_layer": "layer4"}}
    cfg.update(shard_size=5, batch_size=5)


def _dir_is_a_file(field: str) -> Callable[[dict, Path], None]:
    def mutate(cfg: dict, tmp: Path) -> None:
        (tmp / "file").write_text("not a directory")
        cfg[field] = str(tmp / "file")

    return mutate


def _images(value: float | None = None, scale: float = 1.0) -> torch.Tensor:
    x = torch.rand(2, 3, 16, 16) * scale
    if value is not None:
        x[1, 0, 3, 4] = value
    return x


def _attack(x: torch.Tensor) -> Callable[[], Any]:
    setup = make_task("classification", n=2)
    return lambda: run_attack(build_attack("pgd", steps=1), setup.adapter, x, setup.y[: max(1, x.shape[0])])


def _same_config(tmp: Path, run: CompletedRun) -> list[str]:
    path = tmp / "same.yaml"
    path.write_text(yaml.safe_dump(run.cfg))
    return ["run", str(path), "-q"]


# ---------------------------------------------------------------------------------------------- the catalogue
CASES: list[Case] = [
    cli(
        "malformed_yaml",
        "malformed YAML",
        lambda t, r: _yaml_file(t, "name: x\nattacks: [pgd\n"),
        "bad.yaml: line ",
        "malformed YAML",
    ),
    cli(
        "yaml_python_tag",
        "YAML that tries to construct a Python object (`!!python/object/apply:os.system`)",
        lambda t, r: _yaml_file(t, f"name: !!python/object/apply:os.system ['touch {t}/pwned']\n"),
        "bad.yaml: ",
        "malformed YAML",
        "could not determine a constructor",
    ),
    cli(
        "config_not_a_mapping",
        "a config that is not a mapping",
        lambda t, r: _yaml_file(t, "- a\n- b\n"),
        "bad.yaml: expected a mapping at the top level, got list",
    ),
    config("unknown_key", "unknown key", _set("colour", value="blue"), "colour: unknown key"),
    config(
        "unknown_nested_key", "unknown key in a section", _set("dataset", "lmit", value=5), "dataset.lmit: unknown key"
    ),
    config("wrong_type", "wrong type", _set("batch_size", value="ten"), "batch_size: Input should be a valid integer"),
    config(
        "negative_eps",
        "negative eps",
        _set("attacks", "1", "eps", value=-4),
        "pgd.eps: expected >= 0 and <= 255 (in /255 units), got -4",
    ),
    config(
        "absurd_eps",
        "absurd eps (> 255/255)",
        _set("attacks", "1", "eps", value=1000),
        "pgd.eps: expected >= 0 and <= 255 (in /255 units), got 1000",
    ),
    config(
        "nan_eps", "eps: .nan", _set("attacks", "1", "eps", value=float("nan")), "pgd.eps: expected >= 0", "got nan"
    ),
    config(
        "steps_zero", "steps: 0", _set("attacks", "1", "steps", value=0), "pgd.steps: expected an integer >= 1, got 0"
    ),
    config(
        "shard_size_zero",
        "shard_size: 0",
        _set("shard_size", value=0),
        "shard_size: Input should be greater than or equal to 1",
    ),
    config(
        "misaligned_batches",
        "shard_size not a multiple of batch_size",
        _set("shard_size", value=7),
        "shard_size (7) must be a multiple of batch_size (5)",
    ),
    config(
        "unknown_attack",
        "unknown attack",
        lambda c, t: c["attacks"].append({"name": "pgdd"}),
        "attacks.2",
        "unknown attack 'pgdd'; did you mean 'pgd'",
    ),
    config(
        "unknown_defense",
        "unknown defense",
        _set("defenses", "1", "name", value="equivarance"),
        "defenses.1",
        "unknown defense 'equivarance'; did you mean 'equivariance'",
    ),
    config(
        "unknown_attack_param",
        "unknown attack parameter",
        _set("attacks", "1", "epss", value=8),
        "attack 'pgd' got unknown parameter(s) ['epss']",
    ),
    config(
        "eval_draws_zero",
        "eval_draws: 0",
        _set("defenses", "1", "eval_draws", value=0),
        "defenses.1.eval_draws: Input should be greater than or equal to 1",
    ),
    config(
        "loss_not_for_task",
        "a segmentation loss on a classifier",
        _set("attacks", "1", value={"name": "apgd", "eps": 8, "loss": "masked_ce"}),
        "attacks.1 (apgd): loss 'masked_ce' is not defined for classification models (only ['segmentation'])",
    ),
    config(
        "apgd_step_size",
        "a step size for APGD",
        _set("attacks", "1", value={"name": "apgd", "eps": 8, "step_size": 2}),
        "apgd.step_size: the apgd optimizer sets its own step size; remove step_size, or set optimizer: pgd",
    ),
    config(
        "unknown_suite",
        "an unknown suite",
        _set("suite", value={"name": "strongest", "eps": 8}),
        "suite: name: Input should be 'standard'",
    ),
    config(
        "unknown_model",
        "unknown model",
        _set("model", "name", value="resnet5O"),
        "model.name: unknown model 'resnet5O'",
    ),
    config(
        "unknown_graph",
        "unknown model graph",
        _set("model", "graph", value="fast"),
        "model.graph: expected one of plain, optimized, got 'fast'",
    ),
    config(
        "unknown_dataset",
        "unknown dataset",
        _set("dataset", "name", value="mnits"),
        "dataset.name: unknown dataset 'mnits'",
    ),
    config(
        "code_as_model_name",
        "a `module:attr` name (`os:system`) where a model name goes",
        _set("model", "name", value="os:system"),
        "model.name: unknown model 'os:system'",
    ),
    config(
        "missing_dataset_root",
        "missing dataset root",
        _set("dataset", "params", "root", value="/nonexistent/mnist"),
        "/nonexistent/mnist: MNIST root does not exist (expected folders test/ and train/)",
    ),
    config("wrong_dataset_layout", "wrong dataset layout", _wrong_layout, "flat: expected folder test/ for the MNIST"),
    config("undecodable_image", "undecodable image", _undecodable_image, "mnist_00_7.png: cannot decode image"),
    config(
        "label_out_of_range",
        "label out of range",
        _label_out_of_range,
        "mnist_99_12.png: label value 12 out of range (expected 0..9)",
    ),
    config(
        "dataset_file_outside_root",
        "a dataset file that is a symlink out of its root",
        _symlink_out_of_root,
        "mnist_00_7.png: resolves to",
        "outside the dataset root",
    ),
    config(
        "empty_selection",
        "an empty sample selection (empty shard)",
        _set("dataset", "indices", value=[]),
        "dataset.indices/limit: the selection from dataset 'mnist' (20 samples) is empty; expected at least one",
    ),
    config(
        "index_out_of_range",
        "a sample index out of range",
        _set("dataset", "indices", value=[0, 99]),
        "dataset.indices: [99] out of range for 20 samples",
    ),
    config(
        "task_mismatch",
        "a segmentation model on a classification dataset",
        _set("model", value={"name": "drn_tiny_seg", "checkpoint": "none"}),
        "model 'drn_tiny_seg' is a segmentation model but dataset 'mnist' is a classification dataset",
    ),
    config(
        "wrong_class_count",
        "wrong class count between model and dataset",
        _wrong_class_count,
        "model 'resnet50' on dataset 'imagenet': model outputs 1000 classes but the dataset has 5",
    ),
    config(
        "missing_checkpoint",
        "missing checkpoint",
        _set("model", "checkpoint", value="/nonexistent/w.pt"),
        "checkpoint not found: /nonexistent/w.pt",
    ),
    config(
        "other_architecture",
        "checkpoint of another architecture",
        lambda c, t: _checkpoint(c, t, seeded_model(TinyClassifier, 0).state_dict()),
        "weights.pt does not fit model 'lenet5_mnist_clean': missing keys [linear1.bias, linear1.weight, ",
        "shape mismatch [conv1.bias [8] vs [32]",
    ),
    config(
        "truncated_checkpoint",
        "truncated checkpoint",
        _truncated_checkpoint,
        "checkpoint ",
        "weights.pt is truncated or corrupt",
    ),
    config(
        "pickle_with_code",
        "a pickle checkpoint carrying code",
        _code_checkpoint,
        "refusing to load ",
        "weights.pt: it contains Python objects other than tensors (weights_only=True)",
    ),
    config(
        "nan_checkpoint",
        "NaN in a checkpoint's weights",
        _nan_checkpoint,
        "weights.pt: tensor(s) [conv1.weight] contain NaN/Inf (expected finite weights)",
    ),
    config(
        "inf_features",
        "Inf in the model's features (weights that overflow)",
        lambda c, t: _checkpoint(c, t, _lenet_state(scale=1e30)),
        "model 'lenet5_mnist_clean' (checkpoint ",
        "its features for sample test/000000 contain NaN/Inf",
    ),
    engine(
        "nan_images",
        "NaN or Inf in images",
        _attack(_images(float("nan"))),
        "attack input: 1 NaN/Inf value(s); images must be finite",
    ),
    engine(
        "images_out_of_range",
        "images outside [0, 1]",
        _attack(_images(scale=2.0)),
        "attack input: values must lie in [0, 1], got range",
    ),
    engine(
        "empty_batch",
        "an empty batch of images",
        _attack(torch.zeros(0, 3, 16, 16)),
        "attack input: empty batch (0, 3, 16, 16)",
    ),
    config(
        "unset_env_var",
        "a `${VAR}` path whose variable is not set",
        _set("dataset", "params", "root", value="${EQUI_TEST_UNSET_ROOT}"),
        "dataset.params.root: environment variable EQUI_TEST_UNSET_ROOT is not set",
    ),
    config(
        "path_escapes_cwd",
        "a relative path that leaves the working directory",
        _set("results_dir", value="../../outside-results"),
        "results_dir: '../../outside-results' leaves the working directory",
    ),
    config(
        "results_dir_is_a_file",
        "a results directory that is a file",
        _dir_is_a_file("results_dir"),
        "results_dir: ",
        "file exists and is not a directory",
    ),
    config(
        "cache_dir_is_a_file",
        "a cache directory that is a file",
        _dir_is_a_file("cache_dir"),
        "cache_dir: ",
        "file exists and is not a directory",
    ),
    cli(
        "missing_config",
        "a config file that does not exist",
        lambda t, r: ["run", str(t / "nope.yaml")],
        "config file not found: ",
        "nope.yaml",
    ),
    cli(
        "unknown_run_id",
        "an unknown run id for resume",
        lambda t, r: ["resume", "no-such-run", "-r", str(r.results_dir)],
        "no run 'no-such-run' under ",
        "(known: ['kept-",
    ),
    cli(
        "unsafe_run_id",
        "a run id that is a path (`../x`)",
        lambda t, r: ["report", "../x", "-r", str(r.results_dir)],
        "run id '../x' is not a safe path component",
    ),
    cli(
        "sql_error",
        "an SQL error in `equi query`",
        lambda t, r: ["query", "selec 1", "-r", str(r.results_dir)],
        'Parser Error: syntax error at or near "selec"',
    ),
    cli(
        "sql_write",
        "a writing statement in `equi query`",
        lambda t, r: ["query", f"COPY (select 1) TO '{t}/x.csv'", "-r", str(r.results_dir)],
        "only read-only queries are allowed",
        "got COPY",
    ),
    cli(
        "run_already_running",
        "the same config while it is already running",
        _same_config,
        "is already running (pid ",
        "wait for it to finish",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_in_one_line_and_keeps_the_completed_run(
    case: Case, completed_run: CompletedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EQUI_TEST_UNSET_ROOT", raising=False)
    before = snapshot(completed_run)
    live_run: AbstractContextManager = nullcontext()
    if case.id == "run_already_running":  # a live run of the same config holds the run's lock
        live_run = run_lock(completed_run.results_dir, completed_run.run_id)
    with live_run:
        (code, text), seconds = timed_call(lambda: case.run(tmp_path, completed_run))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    message = lines[0]
    if code is not None:
        assert code == 2 and message.startswith("error: "), (code, message)
    for part in case.expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert snapshot(completed_run) == before, "a bad input changed the completed run's files"
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "code-ran").exists()
    assert not (tmp_path / "x.csv").exists()
    assert seconds < BAD_INPUT_SECONDS, f"{case.id} took {seconds:.1f} s"


def test_catalogue_has_at_least_25_cases_and_is_in_the_readme() -> None:
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    readme = (REPO / "README.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in readme]
    assert not missing, f"README troubleshooting table lacks {missing}"


def unit_keys(results: Path, run_id: str) -> set[tuple[str, str]]:
    return {(u["attack_key"], u["defense_key"]) for u in map(R.read_shard_unit, R.list_shards(results, run_id))}


def pipeline_samples(results: Path, run_id: str, exclude: set[tuple[str, str]] = frozenset()) -> list[tuple]:
    """Per-image rows of a run's shard files: (sample, defense, attack, pred, equivariance after, purify L_inf)."""
    out = []
    for path in R.list_shards(results, run_id):
        unit = R.read_shard_unit(path)
        if (unit["attack_key"], unit["defense_key"]) in exclude:
            continue
        for r in R.read_shard(path)[0].to_pylist():
            out.append(
                (r["sample_id"], r["defense"], r["attack"], r["pred"], r["equivariance_after"], r["purify_linf_255"])
            )
    return sorted(out)


def test_a_cache_from_an_older_code_version_is_recomputed_not_reused(
    completed_run: CompletedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catalogue entry `older_code_version`: cache keys and result keys include the versions of the code they ran,
    so after an upgrade of that code nothing computed by the old code is read; the old files stay as they were."""
    results, cache = tmp_path / "results", tmp_path / "cache"
    shutil.copytree(completed_run.results_dir, results)
    shutil.copytree(completed_run.cache_dir, cache)
    cfg = parse_config({**completed_run.cfg, "results_dir": str(results), "cache_dir": str(cache)})
    old_files = {p: p.read_bytes() for p in [*results.rglob("samples/**/*.parquet"), *cache.rglob("*")] if p.is_file()}
    old_keys = {R.read_shard_unit(p)["attack_key"] for p in R.list_shards(results, cfg.run_id())}
    old_units = unit_keys(results, cfg.run_id())

    from tasks import code_identity

    # A newer version of both shard steps: every attack image and every unit is made by other code now.
    monkeypatch.setitem(code_identity.STEP_VERSIONS, "attack", "2-newer")
    monkeypatch.setitem(code_identity.STEP_VERSIONS, "defend", "2-newer")
    summary = pipeline.run(cfg)
    assert summary.ok and summary.computed == summary.n_shards * 4 and summary.skipped == 0
    rows = R.read_results_table(results, cfg.run_id()).to_pylist()
    assert {r["attack_key"] for r in rows if r["attack"] != "clean"}.isdisjoint(old_keys)
    assert all(p.read_bytes() == data for p, data in old_files.items()), "old entries were modified"
    # Same config, new code version: the randomised defense draws the same noise, so every per-image value repeats.
    old_rows = pipeline_samples(completed_run.results_dir, cfg.run_id())
    assert old_rows == pipeline_samples(results, cfg.run_id(), exclude=old_units)
    assert any(r[1] == "equivariance" and r[-1] > 0 for r in old_rows), "no randomised defense in the run"
