"""The equivariance measure is not computed twice for the same images: a defense that leaves its input unchanged
(vanilla) reuses the "before" score as its "after" score, which is exactly what recomputing it would give."""

from __future__ import annotations

from pathlib import Path

from storage.query import query
from tasks import shard_steps
from tests.pipeline_helpers import tiny_config


def test_vanilla_reuses_its_before_score_and_the_numbers_are_those_of_recomputing(tmp_path: Path, monkeypatch) -> None:
    from flows import pipeline
    from tasks.config import parse_config

    calls: list[int] = []
    measure = shard_steps._equivariance

    def counted(rt, x):
        calls.append(x.shape[0])
        return measure(rt, x)

    monkeypatch.setattr(shard_steps, "_equivariance", counted)
    data = tiny_config(tmp_path, cluster={"in_process": True, "torch_threads": 1})
    data["dataset"]["limit"] = 10  # 2 shards of 5, one batch each
    cfg = parse_config(data)
    assert pipeline.run(cfg).ok
    # 2 attacks x 2 shards = 4 batches per defense: vanilla measures once per batch, equivariance twice
    assert len(calls) == 4 * 1 + 4 * 2
    sql = "select attack, sample_id, equivariance_before, equivariance_after from samples where defense = 'vanilla'"
    rows = query(cfg.results_dir, sql).to_pylist()
    assert len(rows) == 2 * 10
    for r in rows:
        assert r["equivariance_after"] == r["equivariance_before"]
    # the reused score is the one a recomputation gives: score the clean images again, directly
    from tasks.runtime import build_runtime

    rt = build_runtime(cfg)
    x, _, ids = rt.batch(rt.indices[:5])
    again = dict(zip(ids, measure(rt, x).tolist(), strict=True))
    clean = {r["sample_id"]: r["equivariance_after"] for r in rows if r["attack"] == "clean"}
    assert all(clean[i] == again[i] for i in ids)
