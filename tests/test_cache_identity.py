"""Cache and result keys carry one code version per component (tasks/code_identity.py), end to end.

A copy of the engine is edited file by file and a real run (in process, on 20 real MNIST digits) is planned and
run again after each edit, in a subprocess that imports the copy: an edit to code a run does not use keeps every
cached attack and every stored unit valid (nothing is recomputed); an edit to one attack's maths recomputes exactly
that attack's images and units; an edit to a defense recomputes that defense's units and the images of the
defense-aware attacks made against it; an edit to the model recomputes everything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.pipeline_helpers import REPO, tiny_config

_PROBE = r"""
import json, sys
from pathlib import Path

from equicore.code_identity import clear_code_identity_cache
from flows import pipeline
from tasks.config import RunConfig
from tasks.runtime import build_runtime
from tasks.units import plan_units

cfg = RunConfig.model_validate(json.loads(sys.argv[1]))
scenarios = json.loads(sys.argv[2])
engine = Path(sys.argv[3])
rt = build_runtime(cfg)


def keys():
    units = plan_units(rt)
    return {
        "images": {f"{s.attack.name}@{s.target_index}": s.attack_key for s in units.images},
        "units": {f"{p.attack.name}/{p.defense.name}": p.defense_key for p in units.pairs},
    }


first = pipeline.run(cfg)
out = {"first": {"computed": first.computed, "ok": first.ok}, "keys": {"none": keys()}, "runs": {}}
for name, files in scenarios.items():
    saved = {f: (engine / f).read_bytes() for f in files}
    for f in files:
        with open(engine / f, "a") as fh:
            fh.write("\n# an edit\n")
    clear_code_identity_cache()
    out["keys"][name] = keys()
    summary = pipeline.run(cfg)
    out["runs"][name] = {"computed": summary.computed, "ok": summary.ok}
    for f, data in saved.items():  # back to the original, and re-run so the next scenario starts from it
        (engine / f).write_bytes(data)
    clear_code_identity_cache()
    pipeline.run(cfg)
print("RESULT" + json.dumps(out))
"""

SCENARIOS = {
    "unrelated": ["datasets/voc.py", "datasets/coco.py", "metrics/bootstrap.py", "models/drn.py", "attacks/square.py"],
    "apgd": ["attacks/apgd.py"],
    "equivariance_defense": ["defenses/consistency.py"],
    "model": ["models/lenet.py"],
}


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("cache-identity")
    shutil.copytree(REPO / "equicore", tmp / "code" / "equicore", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = tiny_config(
        tmp,
        attacks=[
            {"name": "clean"},
            {"name": "pgd", "eps": 48, "step_size": 16, "steps": 2},
            {"name": "apgd", "eps": 48, "steps": 2},
            {"name": "bpda", "eps": 48, "steps": 2, "eot": 1},
        ],
        defenses=[{"name": "vanilla"}, {"name": "equivariance", "steps": 1, "views": ["hflip"], "eval_draws": 1}],
        shard_size=10,
        batch_size=10,
        cluster={"in_process": True},
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / "code"), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(cfg), json.dumps(SCENARIOS), str(tmp / "code" / "equicore")],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def changed(probe: dict, scenario: str) -> dict[str, set[str]]:
    before, after = probe["keys"]["none"], probe["keys"][scenario]
    return {kind: {k for k in before[kind] if before[kind][k] != after[kind][k]} for kind in before}


def test_the_engine_copy_is_what_ran(probe: dict) -> None:
    assert probe["first"] == {"computed": 2 * 4 * 2, "ok": True}  # 2 shards x 4 attacks x 2 defenses
    assert probe["keys"]["model"]["units"] != probe["keys"]["none"]["units"], "edits to the copy were not seen"


def test_an_edit_to_code_the_run_does_not_use_keeps_every_cached_entry(probe: dict) -> None:
    assert changed(probe, "unrelated") == {"images": set(), "units": set()}
    assert probe["runs"]["unrelated"] == {"computed": 0, "ok": True}


def test_an_edit_to_one_attack_recomputes_exactly_that_attack(probe: dict) -> None:
    # BPDA's default optimiser is APGD, so its images (against each defense) go too; PGD's and the units' keys stay.
    assert changed(probe, "apgd") == {"images": {"apgd@-1", "bpda@0", "bpda@1"}, "units": set()}
    # Units are stored under their images' key: those of apgd and bpda (2 defenses x 2 shards each) are redone.
    assert probe["runs"]["apgd"] == {"computed": 2 * 2 * 2, "ok": True}


def test_an_edit_to_a_defense_recomputes_its_units_and_the_images_made_against_it(probe: dict) -> None:
    assert changed(probe, "equivariance_defense") == {
        "images": {"bpda@1"},
        "units": {f"{a}/equivariance" for a in ("clean", "pgd", "apgd", "bpda")},
    }
    assert probe["runs"]["equivariance_defense"] == {"computed": 4 * 2, "ok": True}


def test_an_edit_to_the_model_recomputes_everything(probe: dict) -> None:
    before = probe["keys"]["none"]
    assert changed(probe, "model") == {"images": set(before["images"]), "units": set(before["units"])}
    assert probe["runs"]["model"] == {"computed": 2 * 4 * 2, "ok": True}
