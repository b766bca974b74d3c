"""The CLI on bad input: one clear line naming the field or path, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.pipeline_helpers import tiny_config

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def _message(result) -> str:
    text = (result.stderr or "") + (result.stdout or "")
    return " ".join(text.split())


BAD_CONFIGS = [
    ("unknown_key", lambda c: c.update(colour="blue"), "colour: unknown key"),
    ("unknown_attack", lambda c: c["attacks"].append({"name": "pgdd"}), "unknown attack 'pgdd'; did you mean 'pgd'"),
    ("negative_eps", lambda c: c["attacks"][1].update(eps=-4), "pgd.eps: expected >= 0"),
    ("absurd_eps", lambda c: c["attacks"][1].update(eps=1000), "pgd.eps: expected >= 0 and <= 255"),
    ("steps_zero", lambda c: c["attacks"][1].update(steps=0), "pgd.steps: expected an integer >= 1"),
    ("shard_size_zero", lambda c: c.update(shard_size=0), "shard_size"),
    ("wrong_type", lambda c: c.update(batch_size="ten"), "batch_size"),
    ("unknown_defense_param", lambda c: c["defenses"][1].update(stepz=3), "unknown parameter(s) ['stepz']"),
    ("unknown_model", lambda c: c["model"].update(name="resnet5O"), "model.name: unknown model 'resnet5O'"),
    ("unknown_dataset", lambda c: c["dataset"].update(name="mnits"), "dataset.name: unknown dataset 'mnits'"),
    ("misaligned_batches", lambda c: c.update(shard_size=7), "must be a multiple of batch_size"),
    ("missing_dataset_root", lambda c: c["dataset"]["params"].update(root="/nonexistent/mnist"), "/nonexistent/mnist"),
    (
        "missing_checkpoint",
        lambda c: c["model"].update(checkpoint="/nonexistent/w.pt"),
        "checkpoint not found: /nonexistent/w.pt",
    ),
    (
        "wrong_class_count",
        lambda c: c.update(model={"name": "drn_tiny_seg", "checkpoint": "none"}),
        "is a segmentation model but dataset 'mnist' is a classification dataset",
    ),
]


@pytest.mark.parametrize("case,mutate,expected", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_one_line_and_nothing_written(tmp_path: Path, case, mutate, expected):
    cfg = tiny_config(tmp_path, cluster={"in_process": True})
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = _run("run", str(path), "-q")
    assert result.exit_code == 2, _message(result)
    msg = _message(result)
    assert expected in msg
    assert msg.startswith("error:") and "Traceback" not in msg
    assert not Path(cfg["results_dir"]).exists() and not Path(cfg["cache_dir"]).exists()


def test_malformed_yaml_names_the_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nattacks: [pgd\n")
    result = _run("run", str(path))
    assert result.exit_code == 2
    assert "malformed YAML" in _message(result) and "line" in _message(result)


def test_missing_config_file(tmp_path: Path):
    result = _run("run", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "config file not found" in _message(result)


def test_results_dir_that_is_a_file(tmp_path: Path):
    cfg = tiny_config(tmp_path, cluster={"in_process": True})
    Path(cfg["results_dir"]).write_text("not a directory")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = _run("run", str(path), "-q")
    assert result.exit_code == 2 and "results_dir" in _message(result) and "not a directory" in _message(result)
    assert Path(cfg["results_dir"]).read_text() == "not a directory"


def test_unknown_run_id_and_sql_error(tmp_path: Path):
    results = str(tmp_path / "results")
    for cmd in (["resume", "no-such-run"], ["status", "no-such-run"], ["report", "no-such-run"], ["report", "../x"]):
        result = _run(*cmd, "-r", results)
        assert result.exit_code == 2 and cmd[1] in _message(result), cmd
    result = _run("query", "selec 1", "-r", results)
    assert result.exit_code == 2 and "syntax error" in _message(result).lower()


def test_run_query_report_status_end_to_end(tmp_path: Path):
    cfg = tiny_config(tmp_path, shard_size=10, batch_size=10, cluster={"in_process": True})
    cfg["attacks"] = cfg["attacks"][:1]
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = _run("run", str(path), "-q")
    assert result.exit_code == 0, _message(result)
    out = _message(result)
    assert "Top-1 accuracy (%)" in out and "| clean |" in out
    run_id = next(w for w in out.split() if w.startswith("tiny-")).rstrip(":")
    r = _run(
        "query",
        "select defense, value from results where metric = 'accuracy' order by 1",
        "-r",
        cfg["results_dir"],
        "-f",
        "json",
    )
    assert r.exit_code == 0 and '"defense": "equivariance"' in r.stdout
    r = _run("report", run_id, "-r", cfg["results_dir"], "-f", "csv")
    assert r.exit_code == 0 and r.stdout.startswith("table,attack,defense,value")
    r = _run("status", run_id, "-r", cfg["results_dir"], "--json")
    assert r.exit_code == 0 and '"done": 2' in r.stdout
    # Queries cannot write.
    r = _run("query", f"COPY (select 1) TO '{tmp_path}/x.csv'", "-r", cfg["results_dir"])
    assert r.exit_code == 2 and not (tmp_path / "x.csv").exists()
