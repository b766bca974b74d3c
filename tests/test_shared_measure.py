"""The equivariance measure is not computed twice for the same images:

- the "before" score of an attacked (or clean) shard is measured by the first defense that reads it and shared with
  every other defense of that shard (``storage.measure_cache``), and equals what recomputing it gives;
- a defense that leaves its input unchanged (vanilla) reuses the "before" score as its "after" score;
- a run's tables are identical with and without the shared path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.measure_cache import MeasureCache
from storage.query import query
from tasks import shard_steps
from tests.pipeline_helpers import tiny_config

# Every result column but the run's own identity and timing (the two runs differ in directories, hence config hash).
RESULTS_SQL = "select * exclude (run_id, config_hash, wall_time_s, created_at) from results order by all"
SCORES_SQL = (
    "select attack, defense, sample_id, equivariance_before, equivariance_after from samples "
    "order by attack, defense, sample_id"
)


def _run(tmp_path: Path, monkeypatch, *, share: bool = True, **over) -> tuple[object, list[int]]:
    from flows import pipeline
    from tasks.config import parse_config

    calls: list[int] = []
    measure = shard_steps.equivariance_scores

    def counted(rt, x):
        calls.append(x.shape[0])
        return measure(rt, x)

    monkeypatch.setattr(shard_steps, "equivariance_scores", counted)
    if not share:  # every unit measures its own input, as before the shared path existed
        monkeypatch.setattr(MeasureCache, "read", lambda self, key, shard, ids: None)
    data = tiny_config(tmp_path, cluster={"in_process": True, "torch_threads": 1}, **over)
    data["dataset"]["limit"] = 10  # 2 shards of 5, one batch each
    cfg = parse_config(data)
    assert pipeline.run(cfg).ok
    return cfg, calls


def test_one_measure_per_attacked_shard_and_vanilla_reuses_its_before_score(tmp_path: Path, monkeypatch) -> None:
    cfg, calls = _run(tmp_path, monkeypatch)
    # 2 attacks x 2 shards = 4 input batches, measured once each (shared by both defenses), plus equivariance's
    # "after" on each; vanilla's "after" is its "before"
    assert len(calls) == 4 + 4
    rows = query(cfg.results_dir, SCORES_SQL).to_pylist()
    assert len(rows) == 2 * 2 * 10
    by_input: dict[tuple[str, str], set[float]] = {}
    for r in rows:
        by_input.setdefault((r["attack"], r["sample_id"]), set()).add(r["equivariance_before"])
        if r["defense"] == "vanilla":
            assert r["equivariance_after"] == r["equivariance_before"]
    assert all(len(v) == 1 for v in by_input.values())  # every defense reports the same "before" score


def test_shared_scores_equal_a_recomputation(tmp_path: Path, monkeypatch) -> None:
    cfg, _ = _run(tmp_path, monkeypatch)
    from tasks.runtime import build_runtime

    rt = build_runtime(cfg)
    x, _, ids = rt.batch(rt.indices[:5])
    again = dict(zip(ids, shard_steps.equivariance_scores(rt, x).tolist(), strict=True))
    rows = query(cfg.results_dir, SCORES_SQL).to_pylist()
    clean = {r["sample_id"]: r["equivariance_before"] for r in rows if r["attack"] == "clean"}
    assert all(clean[i] == again[i] for i in ids)  # exactly, not approximately


def test_tables_identical_with_and_without_the_shared_path(tmp_path: Path, monkeypatch) -> None:
    cfg_a, calls_a = _run(tmp_path / "shared", monkeypatch)
    n_shared = len(calls_a)
    with monkeypatch.context() as m:
        cfg_b, calls_b = _run(tmp_path / "own", m, share=False)
    assert len(calls_b) == 4 * 2 + 4  # each defense measures its input
    assert n_shared == 4 + 4
    sql = "select * exclude (run_id) from samples order by attack, defense, sample_id"  # run ids: other dirs
    a, b = query(cfg_a.results_dir, sql).to_pylist(), query(cfg_b.results_dir, sql).to_pylist()
    assert len(a) == 2 * 2 * 10
    assert repr(a) == repr(b)  # repr: exact floats, and NaN (image_miou of classification) equal to itself
    ra = query(cfg_a.results_dir, RESULTS_SQL).to_pylist()
    rb = query(cfg_b.results_dir, RESULTS_SQL).to_pylist()
    assert len(ra) > 0 and repr(ra) == repr(rb)


def test_an_unusable_entry_is_recomputed(tmp_path: Path) -> None:
    cache = MeasureCache(tmp_path / "measures")
    cache.write("k1", 0, ["a", "b"], [0.5, 0.25])
    assert cache.read("k1", 0, ["a", "b"]) == [0.5, 0.25]
    assert cache.read("k1", 0, ["b", "a"]) is None  # other samples: not these scores
    assert cache.read("k1", 1, ["a", "b"]) is None
    cache.path("k1", 0).write_text("{not json")
    assert cache.read("k1", 0, ["a", "b"]) is None
    cache.write("k2", 0, ["a"], [float("nan")])  # not stored: readers recompute
    assert not cache.path("k2", 0).exists()
    with pytest.raises(ValueError):
        cache.write("k3", 0, ["a", "b"], [0.1])
