"""The values the flow passes around: a run's planned units (tasks.units) and its RunStore (storage.run_store)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from storage import examples as E
from storage import locks as L
from storage import results as R
from storage.errors import RunLockedError, RunNotFoundError
from storage.run_store import RunStore
from tasks.config import parse_config
from tasks.runtime import build_runtime
from tasks.units import NO_TARGET, AttackUnit, DefendUnit, outcome_order, plan_units
from tests.pipeline_helpers import tiny_config

UNIT = {"attack_key": "a1", "defense_key": "d1", "shard": 1, "attack": "pgd", "defense": "vanilla"}


# ---------------------------------------------------------------------------------------------- RunStore
def test_run_store_addresses_the_same_files_as_the_storage_functions(tmp_path: Path) -> None:
    store = RunStore(tmp_path, "run1")
    assert store.results_dir == str(tmp_path) and pickle.loads(pickle.dumps(store)) == store
    assert store.shard_path("a1", "d1", 1) == R.shard_path(tmp_path, "run1", "a1", "d1", 1)
    assert store.results_table_path() == R.results_table_path(tmp_path, "run1")
    path = store.write_shard(UNIT, [{"sample_id": "s0", "correct": 1.0}], {"n": np.int64(1)})
    assert path == R.shard_path(tmp_path, "run1", "a1", "d1", 1)
    assert store.shard_done("a1", "d1", 1) and not store.shard_done("a1", "d1", 0)
    assert store.read_shard("a1", "d1", 1)[1] == {"n": 1}
    assert store.read_shard_unit("a1", "d1", 1) == {**UNIT, "run_id": "run1"}
    assert store.list_shards() == [path]
    assert store.discard_shard("a1", "d1", 1) and not path.exists()
    assert store.write_examples(UNIT, []) == E.examples_path(tmp_path, "run1", "a1", "d1", 1)
    assert store.read_examples().num_rows == 0


def test_run_store_manifest_failures_lock_and_status(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path), "run1")
    assert not store.has_manifest() and RunStore.all_in(tmp_path) == []
    with pytest.raises(RunNotFoundError):
        store.status()
    units = [{"attack": "pgd", "defense": "vanilla", "attack_key": "a1", "defense_key": "d1", "unit_key": "a1.d1"}]
    store.write_manifest({"status": "running", "n_shards": 3, "units": units})
    assert store.has_manifest() and RunStore.all_in(tmp_path) == [store]
    assert store.read_manifest() == R.read_run_manifest(tmp_path, "run1")
    store.write_shard({**UNIT, "shard": 0}, [{"sample_id": "s0"}], {})
    store.mark_failed("a1.d1", 1, "RuntimeError: boom")
    store.mark_failed("a1", 2, "attack failed")  # the attack shard a defend unit reads
    assert [f["unit_key"] for f in store.failures()] == ["a1", "a1.d1"]
    (unit,) = store.status()["units"]
    assert unit["done"] == 1 and unit["pending"] == 0
    assert [(f["shard"], f["error"]) for f in unit["failed"]] == [(1, "RuntimeError: boom"), (2, "attack failed")]
    assert store.clear_failed("a1.d1", 1) and not store.clear_failed("a1.d1", 1)
    with store.lock() as path:
        assert path == L.lock_path(tmp_path, "run1") and store.lock_holder() is not None
        with pytest.raises(RunLockedError):
            with L.run_lock(tmp_path, "run1"):
                pass
    assert store.lock_holder() is None


def test_a_run_id_that_is_a_path_fails_on_first_use(tmp_path: Path) -> None:
    store = RunStore(tmp_path, "../x")  # nothing is checked when the value is made
    with pytest.raises(ValueError, match="not a safe path component"):
        store.read_manifest()


# ---------------------------------------------------------------------------------------------- planned units
def test_units_are_planned_once_per_pair_and_travel_as_values(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, cluster={"in_process": True})
    raw["attacks"].append({"name": "bpda", "eps": 48, "steps": 2})  # defense-aware
    raw["dataset"]["limit"] = 10
    units = plan_units(build_runtime(parse_config(raw)))
    assert units.n_shards == 2 and units.n_attacks == 3
    assert [(u.attack_index, u.defense_index) for u in units.pairs] == [(a, d) for a in range(3) for d in range(2)]
    clean, pgd, bpda = (units.pairs_of(a) for a in range(3))
    assert all(u.images is None and u.attack_key == "clean" for u in clean)
    # PGD's images serve every defense; BPDA's are made against each defense, with that defense's parameters.
    assert [s.target_index for s in units.images_of(1)] == [NO_TARGET]
    assert {u.attack_key for u in pgd} == {units.images_of(1)[0].attack_key}
    assert [s.target_index for s in units.images_of(2)] == [0, 1]
    assert [u.images.attack_key for u in bpda] == [s.attack_key for s in units.images_of(2)]
    assert len({u.attack_key for u in bpda}) == 2 and bpda[1].images.identity["defense"] == bpda[1].defense_params
    assert bpda[1].label == "attack bpda / defense equivariance"
    assert units.images_of(2)[1].label == "attack bpda against equivariance"
    assert all(u.unit_key == f"{u.attack_key}.{u.defense_key}" for u in units.pairs)

    again = pickle.loads(pickle.dumps(units))
    assert again.pairs == units.pairs and again.pairs[3].defense_params == units.pairs[3].defense_params
    unit = DefendUnit(bpda[1], 1)
    assert unit.upstream == AttackUnit(units.images_of(2)[1], 1) and DefendUnit(clean[0], 1).upstream is None
    assert {unit: "x"}[pickle.loads(pickle.dumps(unit))] == "x"  # outcomes are keyed by units


def test_outcomes_are_listed_in_the_order_of_the_old_unit_tuples(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, cluster={"in_process": True})
    units = plan_units(build_runtime(parse_config(raw)))
    (pgd_images,) = units.images_of(1)
    work = [DefendUnit(units.pairs[3], 10), DefendUnit(units.pairs[3], 2), AttackUnit(pgd_images, 2)]
    ordered = outcome_order(work)
    assert [str(u.legacy_id()) for u in ordered] == sorted(str(u.legacy_id()) for u in work)
    assert ordered[0].kind == "attack" and [u.shard for u in ordered[1:]] == [10, 2]  # string order, as before


def test_the_prefect_api_records_a_plan_as_its_counts_and_a_store_as_its_paths(tmp_path: Path) -> None:
    from flows.planning import WorkPlan
    from flows.prefect_flow import evaluation_flow

    units = plan_units(build_runtime(parse_config(tiny_config(tmp_path, cluster={"in_process": True}))))
    defend = [DefendUnit(u, shard) for u in units.pairs for shard in range(units.n_shards)]
    plan = WorkPlan(attack_units=[], defend_units=defend, n_shards=units.n_shards, total_defend=len(defend))
    assert plan.defend_units is defend and not plan.empty  # the planned values themselves, not copies
    recorded = evaluation_flow.serialize_parameters({"plan": plan, "store": RunStore(tmp_path, "r")})
    assert recorded["plan"] == {
        "attack_units": 0,
        "defend_units": len(defend),
        "n_shards": units.n_shards,
        "total_defend": len(defend),
        "repaired": [],
    }
    assert recorded["store"] == {"results_dir": str(tmp_path), "run_id": "r"}
    assert pickle.loads(pickle.dumps(plan)).defend_units == defend
