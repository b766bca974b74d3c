"""Fault injection on the real pipeline (issue #7): every disturbed run must end with exactly the table of the
undisturbed in-process run of the same config (``pipeline_reference``), and no partial file may ever count as done.

Faults come from ``EQUI_FAULTS`` (storage/faults.py), so they reach Dask workers and CLI subprocesses unchanged:

- a Dask worker SIGKILLed from outside while it holds a shard (real 2-worker LocalCluster);
- the flow process SIGKILLed mid-attack, mid-write of a Zarr chunk, mid-defense, mid-write of a Parquet shard file,
  mid-reduce and mid-write of the results table, each followed by ``equi resume``;
- a garbled Zarr chunk and a truncated / garbled Parquet shard file, found by their checksums and regenerated;
- a full disk (a real tmpfs in a private mount namespace where possible, else ENOSPC injected at the write layer);
- two ``equi run`` of one config started together (the run lock), and racing writers of one shard file.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows import pipeline
from flows.cli import app
from storage import results as R
from storage.atomic import is_temp_name
from storage.cache import AdversarialCache
from storage.locks import lock_holder
from storage.query import query
from tasks.config import parse_config
from tasks.faults import hits
from tests.pipeline_helpers import REPO, kill_the_holder, table_rows, tiny_config, write_config, write_same_shard

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]

THREADS = {"torch_threads": 1}


def equi(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``equi ARGS`` in a subprocess of its own session, so a fault that SIGKILLs its process group spares pytest."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def assert_nothing_partial_counts(results_dir: str | Path, cache_dir: str | Path, run_id: str) -> None:
    """Every committed shard file reads back whole (pages and state checksums) and every cache shard with a
    completion marker verifies; DuckDB's view sees exactly the committed files' rows, no duplicates."""
    shards = R.list_shards(results_dir, run_id)
    for p in shards:
        R.read_shard(p)
    cache = AdversarialCache(cache_dir)
    for key in cache.keys():
        for marker in (cache.path(key) / "done").glob("shard_*.json"):
            assert cache.verify(key, int(marker.stem.removeprefix("shard_"))), marker
    if shards:
        rows = query(
            results_dir,
            "select attack_key, defense_key, shard, sample_id, count(*) as n from samples "
            f"where run_id = '{run_id}' group by all",
            as_dicts=True,
        )
        assert len(rows) == 5 * len(shards) and all(r["n"] == 1 for r in rows)


# ------------------------------------------------------------------------------------------------ worker SIGKILL
def test_sigkill_of_a_worker_holding_a_shard_reschedules_it_and_the_table_is_unchanged(
    tmp_path, pipeline_reference, monkeypatch
):
    """A worker is SIGKILLed from outside while it holds defense shard 1; Dask reschedules the shard on another
    worker (allowed-failures), the run completes with no failed shard, and the table equals the reference."""
    monkeypatch.setenv("EQUI_FAULTS", "defend:1:1:hold")
    monkeypatch.setenv("EQUI_FAULTS_DIR", str(tmp_path))
    monkeypatch.setenv("EQUI_FAULTS_HOLD_S", "120")
    cfg = parse_config(tiny_config(tmp_path, cluster={"n_workers": 2, **THREADS}))
    killer, killed = kill_the_holder(tmp_path)
    summary = pipeline.run(cfg)
    killer.join(timeout=5)
    assert killed, "no worker reached the fault point"
    assert summary.ok and summary.computed == 16, summary.failed
    pids = hits("defend", 1)
    assert pids[0] == killed[0] and killed[0] not in pids[1:], "the shard was not retried by another process"
    assert table_rows(cfg.results_dir, cfg.run_id()) == pipeline_reference
    assert_nothing_partial_counts(cfg.results_dir, cfg.cache_dir, cfg.run_id())


# ------------------------------------------------------------------------------------------------ flow SIGKILL
KILL_POINTS = [
    # (fault point, shard, what the kill interrupts)
    ("attack-computed", 1, "mid-attack: shard 1's adversarial images computed, not yet cached"),
    ("zarr-chunk", 2, "mid-write of a Zarr chunk: shard 2's chunk file cut to half its bytes, no marker"),
    ("defend-computed", 0, "mid-defense: shard 0 defended and scored, its Parquet file not yet written"),
    ("parquet", 3, "mid-write of a Parquet shard file: the temp file cut to half its bytes, not renamed"),
    ("reduce", 1, "mid-reduce: one (attack, defense) unit merged, the table not written"),
    ("results-parquet", 0, "mid-write of the results table: its temp file cut in half"),
]


def test_sigkill_of_the_flow_process_at_each_point_then_resume_gives_the_same_table(tmp_path, pipeline_reference):
    """The flow process (``--in-process``: it runs the steps itself) is SIGKILLed at six points in turn; after each,
    nothing partial counts as done and the lock is free, and ``equi resume`` goes on to the next point. The last
    resume completes the run with the reference table."""
    cfg_dict = tiny_config(tmp_path, cluster={"in_process": True, **THREADS})
    run_id = parse_config(cfg_dict).run_id()
    results, cache_dir = cfg_dict["results_dir"], cfg_dict["cache_dir"]
    env = {
        "EQUI_FAULTS": ",".join(f"{point}:{shard}:1:kill" for point, shard, _ in KILL_POINTS),
        "EQUI_FAULTS_DIR": str(tmp_path),
    }
    out = equi("run", str(write_config(tmp_path, cfg_dict)), "-q", "--no-report", env=env)
    for point, shard, what in KILL_POINTS:
        assert out.returncode == -signal.SIGKILL, f"{what}: expected a SIGKILL, got {out.returncode}: {out.stderr}"
        assert len(hits(point, shard, directory=tmp_path)) == 1, f"killed elsewhere than {what}"
        assert lock_holder(results, run_id) is None, "a killed run left its lock held"
        assert_nothing_partial_counts(results, cache_dir, run_id)
        if point == "zarr-chunk":  # the half-written version exists on disk but is not a cache entry
            key = next(k for k in AdversarialCache(cache_dir).keys())
            assert list(AdversarialCache(cache_dir).path(key).glob("shard_00002-*"))
            assert not AdversarialCache(cache_dir).has(key, 2)
        if point in ("parquet", "results-parquet"):  # the cut temp file is there, hidden from readers
            assert [p for p in Path(results).rglob("*") if is_temp_name(p.name)]
        if point == "results-parquet":
            assert not R.results_table_path(results, run_id).exists()
        out = equi("resume", run_id, "-r", results, "-q", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert table_rows(results, run_id) == pipeline_reference
    assert_nothing_partial_counts(results, cache_dir, run_id)
    assert len(R.list_shards(results, run_id)) == 16


# ------------------------------------------------------------------------------------------------ corruption
def test_garbled_chunk_and_damaged_shard_files_are_reported_and_regenerated(tmp_path, pipeline_reference):
    """After a complete run: one Zarr chunk garbled (same size), one shard file truncated, one with a page
    garbled. ``equi resume`` names each (found by the checksums recorded at write time) and regenerates exactly
    those; the table equals the reference."""
    cfg = parse_config(tiny_config(tmp_path, cluster={"in_process": True, **THREADS}))
    assert pipeline.run(cfg).ok
    cache = AdversarialCache(cfg.cache_dir)
    (key,) = cache.keys()
    marker = json.loads(cache.marker_path(key, 2).read_text())
    chunk = next(p for p in sorted((cache.path(key) / marker["array"] / "c").rglob("*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    shards = R.list_shards(cfg.results_dir, cfg.run_id())
    truncated, garbled = shards[3], shards[9]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(garbled.read_bytes())
    data[40] ^= 0xFF  # inside the first data page, far from the footer
    garbled.write_bytes(bytes(data))
    untouched = {p: p.stat().st_mtime_ns for p in shards if p not in (truncated, garbled)}

    result = CliRunner().invoke(app, ["resume", cfg.run_id(), "-r", cfg.results_dir, "-q"])
    assert result.exit_code == 0, result.output
    damaged = [ln for ln in result.stderr.splitlines() if ln.startswith("damaged:")]
    assert len(damaged) == 3, result.stderr
    assert any(f"cache key={key} shard=2" in ln and "is corrupt: chunk 0" in ln for ln in damaged)
    assert any(str(truncated) in ln for ln in damaged) and any(str(garbled) in ln for ln in damaged)
    assert "3 damaged file(s) failed their checksums and were regenerated" in result.stdout
    assert "2 unit-shard(s) computed" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
    assert cache.verify(key, 2)
    assert R.read_run_manifest(cfg.results_dir, cfg.run_id())["repaired"] == [ln.split(" ", 1)[1] for ln in damaged]
    assert table_rows(cfg.results_dir, cfg.run_id()) == pipeline_reference


# ------------------------------------------------------------------------------------------------ disk full
def _private_tmpfs_available(tmp: Path) -> list[str] | None:
    """The ``unshare`` command line that gives a private mount namespace where a tmpfs can be mounted, if any."""
    if not shutil.which("unshare"):
        return None
    probe = tmp / "probe"
    probe.mkdir()
    for cmd in (["unshare", "-rm"], ["unshare", "-m"]):
        ok = subprocess.run(
            [*cmd, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"], capture_output=True, timeout=30
        )
        if ok.returncode == 0:
            return cmd
    return None


def test_disk_full_gives_a_clear_error_keeps_the_previous_state_and_resume_finishes(tmp_path, pipeline_reference):
    """A full disk during a run: one line naming the file and saying how to resume, the earlier run's files
    intact, no partial file committed; once space returns, the resume the message names completes the run.

    The disk is a real 2 MiB tmpfs in a private mount namespace (``unshare -rm``, or ``unshare -m`` as root), filled
    by a file until the kernel returns ENOSPC. Where namespaces are not allowed (some CI containers) ENOSPC is
    injected at the write layer instead (``EQUI_FAULTS=parquet:2:1:enospc``); the report says which ran.
    """
    unshare = _private_tmpfs_available(tmp_path)
    mode = "tmpfs" if unshare else "inject"
    cmd = [*(unshare or []), sys.executable, "-m", "tests.disk_full_drill", str(tmp_path), mode]
    drill = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert drill.returncode == 0, drill.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    print(f"disk-full drill mode: {report['mode']}")
    hit = report["hit"]
    lines = [ln for ln in hit["stderr"].splitlines() if ln.startswith("error:")]
    assert hit["rc"] == 2 and len(lines) == 1 and "Traceback" not in hit["stderr"], hit["stderr"]
    message = lines[0]
    assert "no space left on device while writing " in message.lower() and "every finished shard is kept" in message
    assert report["before_intact"] and report["before_intact_after_resume"]
    assert report["temp_files"] == [] and report["committed_problems_after_hit"] == []
    assert report["resume"]["rc"] == 0, report["resume"]["stderr"]
    assert report["committed_problems_after_resume"] == []
    assert [tuple(r) for r in report["rows"]] == pipeline_reference


# ------------------------------------------------------------------------------------------------ concurrency
def test_two_runs_of_one_config_at_once_do_not_collide(tmp_path, pipeline_reference):
    """Two ``equi run`` of the same config started together: one holds the run lock (and is made to take at least
    8 s), the other stops at once with one line naming the holder's pid. No duplicate rows; the reference table."""
    cfg_dict = tiny_config(tmp_path, cluster={"in_process": True, **THREADS})
    run_id = parse_config(cfg_dict).run_id()
    path = write_config(tmp_path, cfg_dict)
    env = {
        **os.environ,
        "EQUI_FAULTS": "defend:0:1:sleep",
        "EQUI_FAULTS_DIR": str(tmp_path),
        "EQUI_FAULTS_SLEEP_S": "8",
    }
    args = [sys.executable, "-m", "flows.cli", "run", str(path), "-q", "--no-report"]
    procs = [
        subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 2)
    winner = next(p for p in procs if p.returncode == 0)
    errors = [ln for ln in loser.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"run {run_id} is already running (pid {winner.pid} on " in errors[0], loser
    assert table_rows(cfg_dict["results_dir"], run_id) == pipeline_reference
    assert_nothing_partial_counts(cfg_dict["results_dir"], cfg_dict["cache_dir"], run_id)
    dupes = query(cfg_dict["results_dir"], "select metric, attack, defense, count(*) n from results group by all")
    assert set(dupes.column("n").to_pylist()) == {1}


def test_racing_writers_of_one_shard_file_leave_one_whole_file(tmp_path):
    """Without the lock (e.g. two runs with different manifests but one shard path), write-once files written to
    a temp name and renamed never interleave: one whole file, no temp files, no duplicate rows."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=write_same_shard, args=(str(tmp_path), w, 20)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    (path,) = R.list_shards(tmp_path, "race")
    table, state = R.read_shard(path)
    assert table.num_rows == 50 and len(set(table.column("sample_id").to_pylist())) == 50
    assert not [p for p in tmp_path.rglob("*") if is_temp_name(p.name)]
