"""Disk-full drill, run by tests/test_faults.py as ``python -m tests.disk_full_drill WORK MODE``.

MODE ``tmpfs``: run inside a private mount namespace (``unshare -rm``); mounts a small tmpfs at WORK/disk, fills
it with a filler file (a real ENOSPC from the kernel), frees the space afterwards ("space returns").
MODE ``inject``: no namespace or mount available; the write layer raises ENOSPC through the fault hook
(``EQUI_FAULTS=parquet:2:1:enospc``, once), the rest is the same.

Steps: a complete run "before" on the disk (the previous state), then ``equi run`` of the reference config hits
the full disk, then the disk is freed and the run is resumed as its error message says. Everything the test
asserts on is written to WORK/report.json (the tmpfs is gone once this process exits).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from flows import pipeline
from storage import results as R
from storage.atomic import is_temp_name
from storage.cache import AdversarialCache
from tasks.config import parse_config
from tests.pipeline_helpers import REPO, table_rows, tiny_config, write_config

TMPFS_SIZE = "2m"  # a complete tiny run needs about 360 KiB
HEADROOM = 96 << 10  # free bytes left on the disk for the run that hits it: enough to start, not to finish


def files_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "locks" not in p.parts
    }


def fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    block = b"\0" * (64 << 10)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(block) == 4096:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def equi(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return {"rc": out.returncode, "stderr": out.stderr, "stdout": out.stdout}


def committed_problems(results_dir: Path, cache_dir: Path, run_id: str) -> list[str]:
    """Committed files (a shard file in place, a cache marker) that do not read back whole: must be none."""
    problems = []
    for p in R.list_shards(results_dir, run_id):
        try:
            R.read_shard(p)
        except Exception as exc:  # noqa: BLE001  (reported to the test)
            problems.append(f"{p}: {exc}")
    cache = AdversarialCache(cache_dir)
    for key in cache.keys():
        for marker in (cache.path(key) / "done").glob("shard_*.json"):
            shard = int(marker.stem.removeprefix("shard_"))
            if not cache.verify(key, shard):
                problems.append(f"cache {key} shard {shard} has a marker but does not verify")
    return problems


def main(work: Path, mode: str) -> None:
    disk = work / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    if mode == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(disk)], check=True)
    results, cache = disk / "results", disk / "cache"
    common = {"results_dir": str(results), "cache_dir": str(cache), "cluster": {"in_process": True}}

    before = parse_config(tiny_config(work, name="before", seed=4, **common))
    assert pipeline.run(before).ok
    before_files = files_digest(disk)

    cfg_dict = tiny_config(work, **common)  # the reference config (name "tiny", seed 3)
    run_id = parse_config(cfg_dict).run_id()
    path = write_config(work, cfg_dict)
    env = {}
    if mode == "tmpfs":
        filler = fill(disk, HEADROOM)
    else:
        env = {"EQUI_FAULTS": "parquet:2:1:enospc", "EQUI_FAULTS_DIR": str(work)}
    hit = equi("run", str(path), "-q", "--no-report", env=env)
    report: dict[str, object] = {
        "mode": mode,
        "hit": hit,
        "before_intact": {k: v for k, v in files_digest(disk).items() if k in before_files} == before_files,
        "temp_files": [str(p) for p in disk.rglob("*") if is_temp_name(p.name)],
        "committed_problems_after_hit": committed_problems(results, cache, run_id),
        "manifest_after_hit": run_id in R.list_runs(results),
        "shards_after_hit": len(R.list_shards(results, run_id)),
    }
    if mode == "tmpfs":
        filler.unlink()  # space returns
    message = str(hit["stderr"])
    if f"equi resume {run_id}" in message:
        again = equi("resume", run_id, "-r", str(results), "-q", env=env)
    else:
        again = equi("run", str(path), "-q", "--no-report", env=env)
    report["resume"] = again
    report["rows"] = table_rows(results, run_id) if again["rc"] == 0 else []
    report["committed_problems_after_resume"] = committed_problems(results, cache, run_id)
    report["before_intact_after_resume"] = {
        k: v for k, v in files_digest(disk).items() if k in before_files
    } == before_files
    (work / "report.json").write_text(json.dumps(report, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
