"""The real pipeline: Prefect flows on a Dask LocalCluster (2 workers), Zarr cache, Parquet results, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows import pipeline
from storage import results as R
from storage.cache import AdversarialCache
from storage.run_store import RunStore
from tasks.config import parse_config
from tasks.faults import hits
from tests.pipeline_helpers import REPO, table_rows, tiny_config, write_config

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]

THREADS = {"torch_threads": 1}


@pytest.fixture(scope="module")
def reference(pipeline_reference):
    """An in-process evaluation of the config (no Prefect, no Dask): what the flow must reproduce exactly."""
    return pipeline_reference


def _markers(cache_dir: str) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in Path(cache_dir).rglob("done/*.json")}


def test_flow_on_local_cluster_matches_in_process_then_skips_then_repairs(tmp_path, reference, monkeypatch):
    # Attack shard 1 fails once (a preempted worker, say): the task's retry must absorb it.
    monkeypatch.setenv("EQUI_FAULTS", "attack:1:1")
    monkeypatch.setenv("EQUI_FAULTS_DIR", str(tmp_path))
    cfg = parse_config(tiny_config(tmp_path, cluster={"n_workers": 2, **THREADS}))
    store = RunStore(cfg.results_dir, cfg.run_id())
    first = pipeline.run(cfg)
    assert first.ok, first.failed
    assert len(hits("attack", 1)) == 2  # failed once, succeeded on the retry
    assert table_rows(cfg.results_dir, cfg.run_id()) == reference

    # Running again computes nothing: no shard is submitted, no cache entry rewritten.
    markers = _markers(cfg.cache_dir)
    parquet = {p: p.stat().st_mtime_ns for p in store.list_shards()}
    again = pipeline.run(cfg)
    assert again.computed == 0 and again.skipped == 16 and again.ok
    assert _markers(cfg.cache_dir) == markers
    assert {p: p.stat().st_mtime_ns for p in store.list_shards()} == parquet
    assert len(store.list_shards()) == 16
    assert table_rows(cfg.results_dir, cfg.run_id()) == reference

    # Delete one shard's Parquet file and one cache chunk; resuming recomputes exactly those two.
    victim = sorted(parquet)[5]
    victim.unlink()
    cache = AdversarialCache(cfg.cache_dir)
    (key,) = cache.keys()
    chunk = next(
        p
        for p in sorted(cache.path(key).rglob("*"))
        if p.is_file() and "shard_00002" in str(p) and f"{os.sep}c{os.sep}" in str(p)
    )
    chunk.unlink()
    resumed = pipeline.resume(store)
    assert resumed.ok and resumed.computed == 1 and resumed.skipped == 15
    changed = {m for m, t in _markers(cfg.cache_dir).items() if markers.get(m) != t}
    assert changed == {str(cache.marker_path(key, 2))}
    unchanged = {p for p, t in parquet.items() if p != victim and p.stat().st_mtime_ns == t}
    assert len(unchanged) == 15
    assert table_rows(cfg.results_dir, cfg.run_id()) == reference


def test_always_failing_shard_is_reported_and_others_complete(tmp_path, reference, monkeypatch):
    monkeypatch.setenv("EQUI_FAULTS", "defend:2:always")
    monkeypatch.setenv("EQUI_FAULTS_DIR", str(tmp_path))
    cfg = parse_config(tiny_config(tmp_path, cluster={"n_workers": 2, **THREADS}))
    # A progress callback holding a lock (like a rich progress bar) must not be shipped to the workers.
    lock, seen = threading.Lock(), []

    def on_done(kind: str) -> None:
        with lock:
            seen.append(kind)

    store = RunStore(cfg.results_dir, cfg.run_id())
    summary = pipeline.run(cfg, on_done=on_done)
    assert sorted(set(seen)) == ["attack", "defend"] and len(seen) == 4 + 16
    assert len(summary.failed) == 4 and {f["shard"] for f in summary.failed} == {2}
    assert all("injected fault" in f["error"] for f in summary.failed)
    st = store.status()
    assert st["manifest"]["status"] == "failed"
    assert all(u["done"] == 3 and len(u["failed"]) == 1 and u["pending"] == 0 for u in st["units"])
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status", cfg.run_id(), "-r", cfg.results_dir],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0 and "injected fault in defend shard 2" in out.stdout
    # The partial table says so; after the cause is gone, resume completes it and clears the failures.
    assert all(r["shards_done"] == 3 for r in store.read_results_table().to_pylist())
    monkeypatch.delenv("EQUI_FAULTS")
    resumed = pipeline.resume(store)
    assert resumed.ok and resumed.computed == 4
    assert store.failures() == []
    assert table_rows(cfg.results_dir, cfg.run_id()) == reference


def test_sigkill_of_the_flow_process_then_resume_gives_the_same_table(tmp_path, reference):
    cfg_dict = tiny_config(tmp_path, cluster={"n_workers": 2, **THREADS})
    path = write_config(tmp_path, cfg_dict)
    run_id = parse_config(cfg_dict).run_id()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(path), "-q"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    samples = Path(cfg_dict["results_dir"]) / "samples"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(samples.rglob("*.parquet"))) < 3:
        time.sleep(0.2)
    done_before_kill = len(list(samples.rglob("*.parquet")))
    os.killpg(proc.pid, signal.SIGKILL)  # the flow process and its Dask workers die at once
    proc.wait(timeout=60)
    assert 3 <= done_before_kill < 16, "the kill must land mid-run"
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "resume", run_id, "-r", cfg_dict["results_dir"], "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert table_rows(cfg_dict["results_dir"], run_id) == reference
    # No half-written file was taken as complete: every shard file reads back with its state.
    for p in RunStore(cfg_dict["results_dir"], run_id).list_shards():
        R.read_shard(p)


@pytest.mark.parametrize("shard_size", [20, 10, 5])
def test_one_two_four_shards_give_identical_metrics(tmp_path, reference, shard_size):
    cfg = parse_config(tiny_config(tmp_path, shard_size=shard_size, cluster={"in_process": True, **THREADS}))
    assert pipeline.run(cfg).ok
    assert table_rows(cfg.results_dir, cfg.run_id()) == reference
