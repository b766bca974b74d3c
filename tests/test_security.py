"""Security defaults (issue #7): checkpoints load with weights_only=True only; configs cannot import or run code
(except a ``model.factory`` naming the user's own module, issue #17: imported in one place, by file path);
paths cannot escape the declared data and output roots through ``..`` or symlinks unless the user passes
``--allow-outside-roots``; local Dask clusters and the temporary Prefect API listen on 127.0.0.1 only; ``equi query``
cannot change the results. Related: tests/test_models.py (pickled code refused), tests/test_storage_query.py
(DuckDB lock-down), tests/test_bad_input_catalogue.py (the same inputs through ``equi run``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

import equicore  # noqa: F401  (registrations)
from equicore.datasets.base import ALLOW_OUTSIDE_ROOTS_ENV
from equicore.errors import DatasetError
from equicore.registry import DATASETS
from flows import execution, pipeline
from flows.cli import app
from flows.prefect_api import prefect_api
from tasks.config import ConfigError, load_config, parse_config
from tasks.paths import check_config_paths, check_output_tree
from tests.pipeline_helpers import PRESET_VARS, REPO, mnist_root, tiny_config

SOURCE_DIRS = ("equicore", "tasks", "flows", "storage", "bench", "scripts")
FIXTURES = REPO / "tests" / "fixtures" / "datasets"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    # Only chains rooted at a name: `model.eval()` on a call result is a method, not the builtin.
    parts.append(func.id if isinstance(func, ast.Name) else "<expression>")
    return ".".join(reversed(parts))


def _sources():
    for d in SOURCE_DIRS:
        for path in sorted((REPO / d).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


# ---------------------------------------------------------------------------------------------- code in inputs
def test_every_torch_load_passes_weights_only_true():
    loads = []
    for path, tree in _sources():
        for call in _calls(tree):
            if _dotted(call.func) == "torch.load":
                flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
                loads.append((path, call.lineno, isinstance(flag, ast.Constant) and flag.value is True))
    assert loads, "the scan found no torch.load at all"
    assert all(ok for _, _, ok in loads), [(str(p), n) for p, n, ok in loads if not ok]


def test_no_code_path_imports_or_evaluates_strings():
    """No dynamic import, eval/exec, unsafe YAML or raw unpickling anywhere in the shipped code: a name in a config
    can only be looked up in a registry (a ``model.factory`` file import: see the next test)."""
    forbidden = {
        "eval",
        "exec",
        "compile",
        "__import__",
        "importlib.import_module",
        "import_module",
        "pickle.load",
        "pickle.loads",
        "yaml.load",
        "yaml.unsafe_load",
        "yaml.full_load",
        "runpy.run_path",
        "runpy.run_module",
    }
    found = [
        (str(path.relative_to(REPO)), call.lineno, _dotted(call.func))
        for path, tree in _sources()
        for call in _calls(tree)
        if _dotted(call.func) in forbidden
    ]
    assert found == []


CODE_NAMES = ["os:system", "builtins:eval", "subprocess.Popen", "equicore.models.zoo:resnet50"]


@pytest.mark.parametrize("name", CODE_NAMES)
def test_config_names_that_look_like_code_are_unknown_names(tmp_path, name):
    """``module:attr`` (or a dotted path) is never imported: every name is looked up in a registry and refused."""
    places = {
        "dataset.name": lambda c: c["dataset"].update(name=name),
        "model.name": lambda c: c["model"].update(name=name),
        "attacks.1": lambda c: c["attacks"][1].update(name=name),
        "attacks.1 (loss)": lambda c: c["attacks"][1].update(loss=name),
        "defenses.0": lambda c: c["defenses"][0].update(name=name),
        "defenses.1 (views)": lambda c: c["defenses"][1].update(views=[name]),
        "measure.views": lambda c: c["measure"].update(views=[name]),
    }
    for where, mutate in places.items():
        cfg = tiny_config(tmp_path)
        mutate(cfg)
        with pytest.raises(ConfigError, match=r"unknown (dataset|model|attack|attack loss|defense|transform)") as info:
            parse_config(cfg)
            pytest.fail(f"{where}: {name!r} accepted")
        assert name in str(info.value), where


def test_user_code_is_imported_in_one_place_only():
    """The one way a config runs code is explicit: ``model.factory`` imports the user's own module, by file path,
    through ``equicore.models.user.import_module_file`` (called from ``tasks.user_code`` only, after the module was
    found in the user's files). No other module imports by file path or executes a module."""
    loaders = {"spec_from_file_location", "module_from_spec", "exec_module", "run_path", "SourceFileLoader"}
    found = sorted(
        {
            str(path.relative_to(REPO))
            for path, tree in _sources()
            for call in _calls(tree)
            if _dotted(call.func).split(".")[-1] in loaders
        }
    )
    assert found == ["equicore/models/user.py"]
    callers = sorted(
        {
            str(path.relative_to(REPO))
            for path, tree in _sources()
            for call in _calls(tree)
            if _dotted(call.func).split(".")[-1] == "import_module_file"
        }
    )
    assert callers == ["tasks/user_code.py"]


def test_no_plugin_flag_exists():
    """Code runs only where a config's model.factory names the user's own module; no flag widens that."""
    result = CliRunner().invoke(app, ["run", "--help"])
    assert "--allow-outside-roots" in result.output and "plugin" not in result.output.lower()


# ---------------------------------------------------------------------------------------------- config paths
@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(ALLOW_OUTSIDE_ROOTS_ENV, raising=False)
    return work


def _cfg(tmp_path: Path, **over) -> object:
    return parse_config(tiny_config(tmp_path, **over))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("results_dir", "../outside", "results_dir: '../outside' leaves the working directory"),
        ("cache_dir", "cache/../../outside", "cache_dir: 'cache/../../outside' leaves the working directory"),
        ("results_dir", "/data/runs/../../etc", "results_dir: '/data/runs/../../etc' contains '..'"),
        ("dataset.params.root", "../mnist", "dataset.params.root: '../mnist' leaves the working directory"),
        ("model.checkpoint", "../stranger.pt", "model.checkpoint: '../stranger.pt' leaves the working directory"),
    ],
)
def test_config_paths_may_not_leave_their_root_through_dotdot(tmp_path, in_tmp_cwd, field, value, message):
    cfg = tiny_config(tmp_path)
    if field.startswith("dataset."):
        cfg["dataset"]["params"]["root"] = value
    elif field.startswith("model."):
        cfg["model"]["checkpoint"] = value
    else:
        cfg[field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_config_paths(parse_config(cfg))


def test_relative_paths_inside_the_working_directory_and_absolute_paths_pass(tmp_path, in_tmp_cwd):
    check_config_paths(_cfg(tmp_path, results_dir=".equi/results", cache_dir="a/../.equi/cache"))
    check_config_paths(_cfg(tmp_path, results_dir=str(tmp_path / "elsewhere" / "results")))


def test_a_symlink_out_of_the_working_directory_is_refused(tmp_path, in_tmp_cwd):
    (tmp_path / "outside").mkdir()
    (in_tmp_cwd / ".equi").symlink_to(tmp_path / "outside")
    with pytest.raises(
        ConfigError, match=r"results_dir: '\.equi/results' resolves to .*outside/results through a symlink"
    ):
        check_config_paths(_cfg(tmp_path, results_dir=".equi/results"))


def test_allow_outside_roots_lifts_the_path_checks(tmp_path, in_tmp_cwd, monkeypatch):
    monkeypatch.setenv(ALLOW_OUTSIDE_ROOTS_ENV, "1")
    check_config_paths(_cfg(tmp_path, results_dir="../outside", cache_dir="/x/../y"))


def test_shipped_configs_pass_the_path_checks(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv(ALLOW_OUTSIDE_ROOTS_ENV, raising=False)
    for path in sorted((REPO / "configs").glob("*/*.yaml")):
        if path.parent.name == "paper":  # absolute paths from the environment, as documented
            for var in PRESET_VARS:
                monkeypatch.setenv(var, str(tmp_path / var.lower()))
        if path.parent.name == "tune":  # a search: its run config (and every candidate's) has the same paths
            from tasks.tune_config import load_tune_config

            check_config_paths(load_tune_config(path).base_config)
            continue
        check_config_paths(load_config(path))


def test_output_folders_that_are_symlinks_out_of_their_root_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_OUTSIDE_ROOTS_ENV, raising=False)
    cfg = _cfg(tmp_path)
    Path(cfg.results_dir).mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (Path(cfg.results_dir) / "runs").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"results_dir: .*/runs is a symlink to .*elsewhere, outside"):
        check_output_tree(cfg)
    (Path(cfg.results_dir) / "runs").unlink()
    Path(cfg.cache_dir).mkdir(parents=True)
    (Path(cfg.cache_dir) / "0123abcd.zarr").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"cache_dir: .*0123abcd\.zarr is a symlink"):
        check_output_tree(cfg)


def test_cli_refuses_an_escaping_path_and_runs_it_with_the_flag(tmp_path, in_tmp_cwd, monkeypatch):
    # Recorded so that the variable the CLI sets for --allow-outside-roots does not leak into later tests.
    monkeypatch.setenv(ALLOW_OUTSIDE_ROOTS_ENV, "0")
    cfg = tiny_config(tmp_path, results_dir="../outside-results", cache_dir="../outside-cache")
    cfg.update(attacks=cfg["attacks"][:1], defenses=cfg["defenses"][:1], cluster={"in_process": True})
    (in_tmp_cwd / "c.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    refused = runner.invoke(app, ["run", "c.yaml", "-q", "--no-report"])
    assert refused.exit_code == 2 and "leaves the working directory" in refused.stderr
    assert not (tmp_path / "outside-results").exists()
    allowed = runner.invoke(app, ["run", "c.yaml", "-q", "--no-report", "--allow-outside-roots"])
    assert allowed.exit_code == 0, allowed.output
    assert list((tmp_path / "outside-results" / "runs").glob("*.json"))


# ---------------------------------------------------------------------------------------------- data roots
def test_dataset_files_named_by_annotations_cannot_leave_the_root(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_OUTSIDE_ROOTS_ENV, raising=False)
    coco = tmp_path / "coco"
    shutil.copytree(FIXTURES / "coco", coco)
    secret = tmp_path / "secret.jpg"
    shutil.copy(coco / "val" / "JPEGImages" / "2011_000003.jpg", secret)
    ann = coco / "annotations" / "instances_val.json"
    data = json.loads(ann.read_text())
    data["images"][0]["file_name"] = "../../secret.jpg"
    ann.write_text(json.dumps(data))
    ds = DATASETS.build("coco", root=str(coco), split="val")
    with pytest.raises(DatasetError, match=r"secret\.jpg, outside the dataset root .*coco/val \(through '\.\.' or a"):
        ds[0]

    voc = tmp_path / "voc"
    shutil.copytree(FIXTURES / "voc" / "VOC2012", voc)
    (tmp_path / "x.jpg").write_bytes((voc / "JPEGImages" / "2011_000003.jpg").read_bytes())
    (tmp_path / "x.png").write_bytes((voc / "SegmentationClass" / "2011_000003.png").read_bytes())
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("../../x\n")
    with pytest.raises(DatasetError, match="outside the dataset root"):
        DATASETS.build("voc", root=str(voc), split="val")[0]

    monkeypatch.setenv(ALLOW_OUTSIDE_ROOTS_ENV, "1")  # --allow-outside-roots
    assert ds[0].image.shape[0] == 3


def test_a_symlinked_dataset_file_leading_outside_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_OUTSIDE_ROOTS_ENV, raising=False)
    root = mnist_root(tmp_path)
    victim = root / "test" / "mnist_00_7.png"
    shutil.move(victim, tmp_path / "elsewhere.png")
    victim.symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(DatasetError, match=r"mnist_00_7\.png: resolves to .*elsewhere\.png, outside the dataset root"):
        DATASETS.build("mnist", root=str(root))
    # A symlink that stays inside the root is fine.
    victim.unlink()
    shutil.move(tmp_path / "elsewhere.png", root / "test" / "real.png")
    victim.symlink_to(root / "test" / "real.png")
    assert len(DATASETS.build("mnist", root=str(root))) == 20


# ---------------------------------------------------------------------------------------------- network binding
def _listening(procs: list[psutil.Process]) -> set[tuple[int, str, int]]:
    out = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.add((p.pid, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _tree() -> list[psutil.Process]:
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


@pytest.mark.slow
def test_local_clusters_and_the_prefect_api_listen_on_localhost_only(tmp_path):
    """Scheduler, nannies, workers, their HTTP endpoints and the temporary Prefect API: every listening socket that
    a run opens is bound to 127.0.0.1, for the LocalCluster of ``equi run`` and the shared one of ``equi demo``."""
    from distributed import LocalCluster

    before = _listening(_tree())
    kwargs = execution.make_task_runner(parse_config(tiny_config(tmp_path, cluster={"n_workers": 2}))).cluster_kwargs
    with LocalCluster(**kwargs) as cluster, execution.local_cluster(2) as (address, _, _), prefect_api():
        opened = _listening(_tree()) - before
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:") and address.startswith("tcp://127.0.0.1:")
        workers = cluster.scheduler_info["workers"]
        assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers)
    assert len(opened) >= 6, opened  # 2 schedulers, 4 nannies/workers, the API server, HTTP endpoints
    assert {ip for _, ip, _ in opened} == {"127.0.0.1"}, opened


# ---------------------------------------------------------------------------------------------- query
def test_equi_query_leaves_the_results_untouched_and_reads_nothing_else(tmp_path):
    cfg = tiny_config(tmp_path, cluster={"in_process": True})
    cfg.update(attacks=cfg["attacks"][:1], defenses=cfg["defenses"][:1])
    assert pipeline.run(parse_config(cfg)).ok
    root = Path(cfg["results_dir"])

    def state() -> dict[str, tuple[str, int]]:
        return {
            str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    before = state()
    runner = CliRunner()
    ok = runner.invoke(app, ["query", "select count(*) as n from samples", "-r", str(root), "-f", "json"])
    assert ok.exit_code == 0 and '"n": 20' in ok.stdout
    for sql in ("select * from read_csv('/etc/passwd')", "CREATE TABLE t AS SELECT 1", "ATTACH 'x.db'"):
        refused = runner.invoke(app, ["query", sql, "-r", str(root)])
        assert refused.exit_code == 2 and refused.stderr.startswith("error:"), (sql, refused.output)
    assert state() == before
