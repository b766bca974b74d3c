"""The README's "Evaluate your own model" examples, run exactly as written (issue #17).

The code blocks are extracted from README.md by their markers (``<!-- byo-file: EXAMPLE/NAME -->`` before a file,
``<!-- byo-commands: EXAMPLE -->`` before the shell commands), so the README and this test cannot drift. Each
example is written into a temporary folder and its commands run there in order: the scripts and ``equi resume`` as
new processes, the other ``equi`` commands through the same CLI in this process. The classification example takes
the default path (a local Dask cluster, whose worker imports ``my_models.py`` by its file path), the segmentation
one runs in process. ``equi resume`` re-validates the stored config in a new process, after one shard file of the
run was deleted, and recomputes exactly that one.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.pipeline_helpers import REPO

pytestmark = pytest.mark.slow

_BLOCK = re.compile(r"<!-- byo-(file|commands): (\S+) -->\n```\w*\n(.*?)```", re.S)


def readme_blocks() -> dict[str, dict[str, str]]:
    """example -> {file name or "commands": text}."""
    out: dict[str, dict[str, str]] = {}
    for kind, where, text in _BLOCK.findall((REPO / "README.md").read_text()):
        if kind == "file":
            example, name = where.split("/", 1)
        else:
            example, name = where, "commands"
        out.setdefault(example, {})[name] = text
    return out


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.pop("EQUI_RESULTS_DIR", None)
    return env


def _run(line: str, cwd: Path, run_id: str | None) -> str:
    """Run one README command in ``cwd``; its output. ``equi resume`` and scripts run in a new process (the resume
    re-validates the stored config there); other ``equi`` commands in this one (typer's runner: the same CLI, without
    paying a Python start-up per command). Dask workers are their own processes either way."""
    command = line.split("#", 1)[0].strip()
    if run_id is not None:
        command = re.sub(r"[\w.-]+-<hash>", run_id, command)
    argv = shlex.split(command)
    if argv[0] == "equi" and argv[1] != "resume":
        previous = os.getcwd()
        os.chdir(cwd)
        try:
            result = CliRunner().invoke(app, argv[1:])
        finally:
            os.chdir(previous)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == 0, f"{command}\n{result.output}"
        return result.output
    argv = [sys.executable, *(["-m", "flows.cli"] if argv[0] == "equi" else []), *argv[1:]]
    done = subprocess.run(argv, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def run_example(example: str, tmp: Path) -> dict[str, str]:
    """Write the example's files into ``tmp``, run its commands in order; command -> its output. Before
    ``equi resume`` one shard file is deleted, so the resume has exactly one unit-shard to compute."""
    blocks = readme_blocks()[example]
    for name, text in blocks.items():
        if name != "commands":
            (tmp / name).write_text(text)
    outputs: dict[str, str] = {}
    run_id = None
    for line in blocks["commands"].splitlines():
        if not line.strip():
            continue
        verb = line.split()[1] if line.startswith("equi ") else line.split()[0]
        if verb == "resume":
            shards = sorted((tmp / ".equi" / "results" / "samples").rglob("shard=*.parquet"))
            shards[-1].unlink()
        outputs[verb] = _run(line, tmp, run_id)
        if verb == "run":
            run_id = re.search(r"run (\S+): \d+ samples", outputs[verb]).group(1)  # type: ignore[union-attr]
            outputs["run_id"] = run_id
    return outputs


def test_the_readme_has_both_examples() -> None:
    blocks = readme_blocks()
    assert set(blocks) == {"classification", "segmentation"}
    assert "factory" in blocks["classification"]["colours.yaml"]
    assert "segmentation_folder" in blocks["segmentation"]["squares.yaml"]
    for example in blocks.values():
        verbs = [ln.split()[1] for ln in example["commands"].splitlines() if ln.startswith("equi ")]
        assert verbs[0] == "run" and {"status", "resume", "report"} <= set(verbs)


@pytest.fixture
def one_prefect_api() -> Iterator[None]:
    """One Prefect API for the example's `equi run` and `equi resume` (each would start and stop its own, about
    16 s here); both honour PREFECT_API_URL, as for a server the user runs. The Dask cluster is still each run's."""
    from flows.prefect_api import prefect_api

    with prefect_api():
        yield


def test_classification_example_on_dask_workers(tmp_path: Path, one_prefect_api: None) -> None:
    out = run_example("classification", tmp_path)
    run_id = out["run_id"]
    assert run_id.startswith("tiny-colours-")
    assert "--in-process" not in readme_blocks()["classification"]["commands"]  # the worker imports my_models.py
    assert "in_process" not in readme_blocks()["classification"]["colours.yaml"]
    assert re.search(rf"{run_id[:12]}\S*\s+.\s+complete", out["status"]), out["status"]
    assert "1 unit-shard(s) computed, 11 already done" in out["resume"], out["resume"]
    report = out["report"]
    assert f"## {run_id}: image_folder / my_models:build (8 samples, 2 shards, status complete)" in report
    # The fitted model, its normalisation and ImageFolder's labels agree: every clean image is right.
    assert re.search(r"\| clean \| 100\.00 \[100\.0, 100\.0\] \|", report), report


def test_segmentation_example_in_process(tmp_path: Path) -> None:
    out = run_example("segmentation", tmp_path)
    run_id = out["run_id"]
    assert run_id.startswith("tiny-squares-")
    assert "model seg_models:build: weights" in out["status"] and "code factory:" in out["status"]
    assert "1 unit-shard(s) computed, 11 already done" in out["resume"], out["resume"]
    report = out["report"]
    assert "segmentation_folder / seg_models:build (8 samples" in report and "mIoU" in report
    clean = re.search(r"\| clean \| ([\d.]+) ", report)
    assert clean and float(clean.group(1)) > 60.0, report  # the fitted net finds the squares
