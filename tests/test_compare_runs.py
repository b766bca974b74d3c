"""scripts/compare_runs.py, the check of a pure refactor: per-image rows are matched per planned unit, so two
defenses that share a name (``equivariance`` with two view sets) are compared with themselves, never with each other,
and a difference in either is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.pipeline_helpers import REPO

RUN = "tiny-0123456789"
# Two units of one name; their storage keys differ between code versions, their plan positions do not.
UNITS = [("clean", "equivariance"), ("clean", "equivariance")]


def results_dir(root: Path, keys: list[str], values: list[float]) -> Path:
    """A results directory of one run: one shard per unit (defense key ``keys[i]``, value ``values[i]``) and a
    results table. ``keys`` in an order other than plan order puts the units' files in another path order."""
    (root / "runs").mkdir(parents=True)
    units = [
        {"attack": a, "attack_key": "clean", "defense": d, "defense_key": k}
        for (a, d), k in zip(UNITS, keys, strict=True)
    ]
    (root / "runs" / f"{RUN}.json").write_text(json.dumps({"run_id": RUN, "units": units}))
    for key, value in zip(keys, values, strict=True):
        folder = root / "samples" / f"run_id={RUN}" / "attack_key=clean" / f"defense_key={key}"
        folder.mkdir(parents=True)
        row = {"sample_id": "test/000000", "attack": "clean", "defense": "equivariance", "shard": 0, "value": value}
        pq.write_table(pa.Table.from_pylist([row]), folder / "shard=00000.parquet")
    table = root / "results" / f"run_id={RUN}"
    table.mkdir(parents=True)
    cells = [
        {"run_id": RUN, "attack_index": 0, "defense_index": i, "attack": "clean", "defense": "equivariance"}
        | {"metric": "accuracy", "value": 1.0}
        for i in range(len(UNITS))
    ]
    pq.write_table(pa.Table.from_pylist(cells), table / "table.parquet")
    return root


def compare(before: Path, after: Path) -> subprocess.CompletedProcess:
    script = REPO / "scripts" / "compare_runs.py"
    return subprocess.run([sys.executable, str(script), str(before), str(after)], capture_output=True, text=True)


def test_same_named_defenses_are_matched_by_their_plan_position(tmp_path: Path) -> None:
    # After the change the storage keys sort the other way round: matched by name, the units would be swapped.
    before = results_dir(tmp_path / "before", ["a1", "a2"], [0.25, 0.75])
    after = results_dir(tmp_path / "after", ["b2", "b1"], [0.25, 0.75])
    done = compare(before, after)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical: 2 per-image rows" in done.stdout


def test_a_difference_in_one_of_two_same_named_defenses_is_reported(tmp_path: Path) -> None:
    before = results_dir(tmp_path / "before", ["a1", "a2"], [0.25, 0.75])
    after = results_dir(tmp_path / "after", ["b1", "b2"], [0.25, 0.5])
    done = compare(before, after)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "value: 0.75 before, 0.5 after" in done.stdout
