"""Per-component code identity: an entry's ``code_version`` changes when the code its maths run changes, and only
then. Checked on a copy of the ``equicore`` package whose files are edited, imported in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import equicore
from equicore.attacks import attack_code_version, build_attack
from equicore.code_identity import code_version, module_file, modules_digest
from equicore.errors import InvalidInputError
from equicore.registry import ATTACKS, LOSSES

PACKAGE = Path(equicore.__file__).parent

# Run in the subprocess: for each scenario, append a comment to its files (a code change, not a maths change), read
# every entry's code_version afresh, restore the files. Prints {scenario: {kind: {name: code_version}}}.
_PROBE = """
import json, sys
from pathlib import Path
import equicore
from equicore.code_identity import clear_code_identity_cache

root = Path(equicore.__file__).parent
scenarios = json.loads(sys.argv[1])
out = {"__file__": equicore.__file__}
for scenario, files in scenarios.items():
    saved = {f: (root / f).read_bytes() for f in files}
    for f in files:
        (root / f).write_bytes(saved[f] + b"\\n# an edit\\n")
    clear_code_identity_cache()
    out[scenario] = {k: {n: r.code_version(n) for n in r.names()} for k, r in equicore.REGISTRIES.items()}
    for f in files:
        (root / f).write_bytes(saved[f])
print(json.dumps(out))
"""

SCENARIOS = {
    "none": [],
    "apgd": ["attacks/apgd.py"],
    "loop": ["attacks/loop.py"],
    "losses": ["attacks/losses.py"],
    "dense_losses": ["attacks/dense_losses.py"],
    "seeding": ["seeding.py"],
    "selfsup": ["defenses/selfsup.py"],
    "consistency": ["defenses/consistency.py"],
    "voc": ["datasets/voc.py"],
    "drn": ["models/drn.py"],
    "instance_adapter": ["adapters/instance.py"],
    "registration_tables": ["attacks/specs.py", "attacks/__init__.py", "defenses/__init__.py"],
    "unrelated": ["metrics/bootstrap.py", "registry.py", "validation.py"],
}


def current_versions() -> dict[str, dict[str, str]]:
    return {k: {n: r.code_version(n) for n in r.names()} for k, r in equicore.REGISTRIES.items()}


@pytest.fixture(scope="module")
def edited(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, str]]]:
    copy = tmp_path_factory.mktemp("identity") / "equicore"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("weights", "__pycache__"))
    for files in SCENARIOS.values():
        for f in files:
            assert (copy / f).is_file(), f
    env = {**os.environ, "PYTHONPATH": str(copy.parent)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(SCENARIOS)],
        env=env,
        cwd=copy.parent,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(out.pop("__file__")).parent == copy  # the copy was imported, not the checkout
    return out


def changed(edited: dict, scenario: str) -> dict[str, set[str]]:
    """kind -> names whose code_version differs from the unedited copy."""
    base, after = edited["none"], edited[scenario]
    out = {k: {n for n in base[k] if after[k][n] != base[k][n]} for k in base}
    return {k: names for k, names in out.items() if names}


def test_identity_does_not_depend_on_where_the_package_is(edited) -> None:
    assert edited["none"] == current_versions()


def test_editing_apgd_changes_the_attacks_that_run_it_and_no_other(edited) -> None:
    assert changed(edited, "apgd") == {"attacks": {"apgd", "apgd_t", "bpda", "aa"}}
    before, after = edited["none"]["attacks"], edited["apgd"]["attacks"]
    assert after["apgd"] != before["apgd"] and after["pgd"] == before["pgd"]


def test_editing_the_shared_loop_changes_its_attacks_and_apgd_not_square(edited) -> None:
    attacks = changed(edited, "loop")["attacks"]
    assert {"fgsm", "ifgsm", "pgd", "mim", "cw", "houdini", "apgd"} <= attacks
    assert "square" not in attacks and set(changed(edited, "loop")) == {"attacks"}


def test_editing_a_loss_module_changes_its_losses_and_the_attacks_using_them(edited) -> None:
    losses = changed(edited, "losses")
    assert losses["losses"] == set(LOSSES.names())  # every loss runs through BoundLoss
    assert losses["attacks"] == set(ATTACKS.names()) - {"square"}  # Square runs no registered loss
    dense = changed(edited, "dense_losses")
    assert dense == {"losses": {"masked_ce", "masked_ce_balanced", "js", "masked_spherical"}}


def test_editing_seeding_changes_every_attack(edited) -> None:
    assert changed(edited, "seeding")["attacks"] == set(ATTACKS.names())


def test_editing_a_defense_module_changes_that_defense_only(edited) -> None:
    assert changed(edited, "selfsup") == {"defenses": {"rotation", "contrastive"}}
    assert changed(edited, "consistency") == {"defenses": {"equivariance", "invariance"}}


def test_editing_a_dataset_changes_that_dataset_only(edited) -> None:
    assert changed(edited, "voc") == {"datasets": {"voc"}}


def test_editing_a_model_or_an_adapter_changes_only_those(edited) -> None:
    assert changed(edited, "drn") == {"models": {"drn_d_22_seg", "drn_tiny_seg"}}
    assert changed(edited, "instance_adapter") == {"adapters": {"instance"}}


def test_registration_tables_training_code_and_reports_are_not_part_of_any_identity(edited) -> None:
    assert changed(edited, "registration_tables") == {}
    assert changed(edited, "unrelated") == {}


# ----------------------------------------------------------------------------------------------- in process


def test_an_attack_built_with_its_defaults_has_its_entry_identity() -> None:
    for name in ATTACKS.names():
        assert attack_code_version(build_attack(name)) == ATTACKS.code_version(name), name


def test_a_built_attack_covers_the_loss_and_optimiser_it_runs() -> None:
    pgd, pgd_dense = build_attack("pgd"), build_attack("pgd", loss="masked_ce")
    assert attack_code_version(pgd_dense) != attack_code_version(pgd)
    runs = ("equicore.attacks.attack", "equicore.attacks.run", "equicore.attacks.loop", "equicore.seeding")
    expected = code_version(ATTACKS.version("pgd"), (*runs, "equicore.attacks.dense_losses", "equicore.attacks.losses"))
    assert attack_code_version(pgd_dense) == expected
    assert attack_code_version(build_attack("pgd", optimizer="apgd")) == code_version(
        ATTACKS.version("pgd"), ATTACKS.modules("apgd")
    )


def test_modules_digest_is_a_set_function_over_source_bytes() -> None:
    a = modules_digest(["equicore.seeding", "equicore.attacks.loop"])
    assert a == modules_digest(["equicore.attacks.loop", "equicore.seeding", "equicore.seeding"])
    assert len(a) == 64 and a != modules_digest(["equicore.seeding"])
    assert module_file("equicore.attacks") == str(PACKAGE / "attacks" / "__init__.py")
    with pytest.raises(InvalidInputError, match="cannot find module 'equicore.nope'|no Python source"):
        modules_digest(["equicore.nope"])
    with pytest.raises(InvalidInputError, match="no modules"):
        modules_digest([])
    assert code_version("2", ["equicore.seeding"]) == f"2:{modules_digest(['equicore.seeding'])[:16]}"
