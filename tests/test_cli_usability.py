"""The CLI as a user meets it: read-only commands that do not import torch/Prefect/Dask, overrides from the command
line (--set, --limit, --device) checked like the file, --dry-run, plain progress lines, whole run ids."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.cli_progress import ShardLog
from tests.pipeline_helpers import tiny_config, write_config

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "prefect", "distributed", "dask", "matplotlib")
LONG_NAME = "an-experiment-whose-long-name-a-narrow-terminal-would-cut"
runner = CliRunner()


def _message(result) -> str:
    """What the command printed as one line of words (table borders dropped)."""
    text = (result.stderr or "") + (result.stdout or "")
    return " ".join(re.sub(r"[│┃]", " ", text).split())


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """A completed in-process run with a long name: (config path, run id, results dir)."""
    from flows import pipeline
    from tasks.config import parse_config

    tmp = tmp_path_factory.mktemp("usability")
    data = tiny_config(tmp, name=LONG_NAME, cluster={"in_process": True, "torch_threads": 1})
    data["dataset"]["limit"] = 5
    data["defenses"] = [{"name": "vanilla"}]
    cfg = parse_config(data)
    assert pipeline.run(cfg).ok
    return write_config(tmp, data), cfg.run_id(), Path(cfg.results_dir)


def _cli_in_fresh_process(args: list[str], cwd: Path, columns: int = 80) -> dict:
    """Run the CLI in a new interpreter; what it printed, its exit code, and which heavy packages it imported."""
    script = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from flows.cli import app\n"
        f"r = CliRunner().invoke(app, {args!r})\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'code': r.exit_code, 'heavy': heavy, 'out': r.output}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": str(columns)}
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_read_only_commands_import_neither_torch_nor_prefect_nor_dask(finished, tmp_path: Path) -> None:
    config, run_id, results = finished
    typo = tmp_path / "typo.yaml"
    data = yaml.safe_load(config.read_text())
    data["attacks"][1]["name"] = "pgdd"
    typo.write_text(yaml.safe_dump(data))
    r = ["-r", str(results)]
    commands = {
        "help": (["--help"], 0),
        "status": (["status", *r], 0),
        "status_run": (["status", run_id, *r], 0),
        "query": (["query", "select attack, defense, value from results", *r], 0),
        "report": (["report", run_id, *r], 0),
        "list": (["list", "models"], 0),
        "bad_config": (["run", str(typo)], 2),
    }
    for what, (args, code) in commands.items():
        out = _cli_in_fresh_process(args, tmp_path)
        assert out["code"] == code, (what, out["out"])
        assert out["heavy"] == [], f"equi {' '.join(args)} imported {out['heavy']}"
    assert "did you mean 'pgd'" in _cli_in_fresh_process(commands["bad_config"][0], tmp_path)["out"]


def test_status_never_cuts_a_run_id_on_a_narrow_terminal(finished, tmp_path: Path) -> None:
    _, run_id, results = finished
    for args in (["status", "-r", str(results)], ["status", run_id, "-r", str(results)]):
        out = _cli_in_fresh_process(args, tmp_path, columns=40)
        assert run_id in out["out"] and "…" not in out["out"], out["out"]


def test_list_reads_the_catalogue_which_matches_the_live_registries() -> None:
    from equicore import catalogue

    assert catalogue.read() == json.loads(catalogue.render(catalogue.build())), (
        "equicore/catalogue.json is out of date: python -m equicore.catalogue --write"
    )
    listed = runner.invoke(app, ["list", "attacks"])
    assert listed.exit_code == 0 and [line.split()[0] for line in listed.output.splitlines()] == catalogue.names(
        "attacks"
    )


def test_query_rejects_an_unknown_format(finished) -> None:
    _, _, results = finished
    result = runner.invoke(app, ["query", "select 1", "-f", "xml", "-r", str(results)])
    assert result.exit_code == 2 and "--format: expected table, csv, json, got 'xml'" in _message(result)


# ------------------------------------------------------------------------------------------------ overrides
def test_set_limit_and_device_change_the_config_as_the_file_would(finished) -> None:
    from tasks.config import load_config

    config, run_id, _ = finished
    base = load_config(config)
    cfg = load_config(config, ["attacks.1.steps=2", "measure.views=[hflip]", "seed=9"], limit=3, device="cpu")
    assert cfg.attacks[1].params()["steps"] == 2 and cfg.seed == 9 and cfg.dataset.limit == 3
    assert cfg.device == "cpu" and cfg.measure.views == ["hflip"]
    assert cfg.run_id() != base.run_id() == run_id  # what changes the numbers changes the run id
    assert load_config(config, device="cpu").run_id() == run_id  # where it runs does not


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["colour=blue"], "colour: unknown key"),
        (["attacks.1.stepz=2"], "unknown parameter"),
        (["attacks.7.steps=2"], "attacks.7: index out of range (2 entries, 0-based)"),
        (["attacks.1.steps=two"], "steps"),
        (["shard_size"], "expected KEY=VALUE"),
        (["cluster.address=tcp://10.0.0.1:8786"], "pass --cluster ADDRESS"),
        (["seed.x=1"], "seed is a value, not a mapping or list"),
        (["report.title=${HOME}"], "expands only in path fields"),
    ],
)
def test_a_bad_override_is_one_line_exit_2_and_writes_nothing(finished, tmp_path: Path, sets, expected) -> None:
    config, _, _ = finished
    out = tmp_path / "out"
    args = ["run", str(config), "--results-dir", str(out / "r"), "--cache-dir", str(out / "c")]
    result = runner.invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
    assert result.exit_code == 2, result.output
    message = _message(result)
    assert expected in message and "--set" in message and "Traceback" not in result.output
    assert not out.exists()


def test_limit_below_one_is_refused(finished) -> None:
    config, _, _ = finished
    result = runner.invoke(app, ["run", str(config), "--limit", "0"])
    assert result.exit_code == 2 and "--limit: expected a number of samples >= 1" in _message(result)


# ------------------------------------------------------------------------------------------------ dry run
def test_dry_run_prints_the_plan_and_cost_and_writes_nothing(finished, tmp_path: Path) -> None:
    config, run_id, results = finished
    out = tmp_path / "fresh"
    fresh = runner.invoke(
        app, ["run", str(config), "--dry-run", "--results-dir", str(out / "r"), "--cache-dir", str(out / "c")]
    )
    assert fresh.exit_code == 0, fresh.output
    text = _message(fresh)
    # 5 samples, shard_size 5: 1 shard; pgd (3 steps) to attack, clean and pgd x vanilla to defend
    assert f"run {run_id}: 5 samples in 1 shard(s); 3 unit-shard(s) to compute, 0 done or cached" in text
    assert "attack pgd 0 1 3 15" in text  # 3 steps x 1 restart: 3 passes per image, 15 for the shard
    assert "image passes" in text and "ms per image" in text
    assert not out.exists()
    done = runner.invoke(app, ["run", str(config), "--dry-run"])  # the finished run: everything done or cached
    assert done.exit_code == 0 and "0 unit-shard(s) to compute, 3 done or cached" in _message(done)


# ------------------------------------------------------------------------------------------------ progress
def test_plain_progress_prints_one_line_per_shard_with_rate_and_eta() -> None:
    from rich.console import Console

    ticks = iter([0.0, 10.0, 20.0, 30.0])  # started, then three shards 10 s apart
    log = ShardLog(Console(), 1, 2, clock=lambda: next(ticks))
    first, second, third = log.line("attack"), log.line("defend"), log.line("defend")
    assert first == "attack shard done: attack 1/1, defense 0/2 | - shards/min | elapsed 0:10, eta -"
    assert second == "defense shard done: attack 1/1, defense 1/2 | 6.0 shards/min | elapsed 0:20, eta 0:10"
    assert third.endswith("elapsed 0:30, eta 0:00")


def test_a_non_terminal_run_names_its_phases_and_logs_every_shard(tmp_path: Path) -> None:
    data = tiny_config(tmp_path, cluster={"in_process": True, "torch_threads": 1})
    data["dataset"]["limit"] = 10
    data["defenses"] = [{"name": "vanilla"}]
    result = runner.invoke(app, ["run", str(write_config(tmp_path, data)), "--no-report"])
    assert result.exit_code == 0, result.output
    text = result.stderr if result.stderr_bytes is not None else result.output
    for phase in ("loading dataset mnist and model lenet5_mnist_clean", "checking that the 10 selected images decode"):
        assert phase in text
    lines = [line for line in text.splitlines() if " shard done: " in line]
    assert len(lines) == 2 + 2 * 2  # pgd's 2 attack shards, then 2 (attack, defense) pairs x 2 shards
    assert lines[-1].startswith("defense shard done: attack 2/2, defense 4/4") and lines[-1].endswith("eta 0:00")


def test_the_dataset_options_page_is_generated_from_the_code() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_dataset_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    page = (REPO / "docs" / "DATASETS.md").read_text()
    assert "`class_index`" in page and "imagenet_class_index.json" in page


def test_status_lists_why_a_run_failed(tmp_path: Path, monkeypatch) -> None:
    from flows import pipeline
    from tasks.config import parse_config

    monkeypatch.setenv("EQUI_FAULTS", "defend:1:always")
    (tmp_path / "faults").mkdir()
    monkeypatch.setenv("EQUI_FAULTS_DIR", str(tmp_path / "faults"))
    data = tiny_config(tmp_path, cluster={"in_process": True, "torch_threads": 1}, retries=0)
    data["dataset"]["limit"] = 10
    data["defenses"] = [{"name": "vanilla"}]
    cfg = parse_config(data)
    assert len(pipeline.run(cfg).failed) == 2  # shard 1 of clean and of pgd
    result = runner.invoke(app, ["status", "-r", cfg.results_dir])
    run_id = cfg.run_id()
    line = next(line for line in result.output.splitlines() if line.startswith("failed: "))
    assert line.startswith(f"failed: {run_id}: 2 shard(s), first ") and "InjectedFault" in line
    assert f"`equi resume {run_id}`" in line
