"""Worker scaling of a defense-heavy run: 2 local Dask workers against 1 (each single-threaded), and each worker's
peak memory as the dataset grows 4x.

    python -m bench.worker_scaling                    # drn_tiny_seg + equivariance (6 steps), 8 and 32 scenes
    python -m bench.worker_scaling --steps 10 --small 16 --json out.json

Three runs of the pipeline in this process, on a long-lived Prefect server the bench starts (so no run waits for a
temporary API), each with a fresh cache and a run name of its own: 1 worker on the large set, 2 workers on the large
set, 2 workers on the small set. Workload: the built-in Fashion-scenes test split, ``drn_tiny_seg``, the clean images
defended by the equivariance defense, shards of 4 scenes, ``torch_threads: 1``.

- **speed-up**: the compute span of the 1-worker run over that of the 2-worker run, both on the large set. The span
  is read from the Prefect server: first task start to last task end of the run's flow (cluster start-up excluded;
  the run's whole wall time is printed too).
- **memory**: every worker process's peak resident set (``VmHWM``), sampled from ``/proc`` every 0.2 s while the run
  lasts; ``rss_growth`` is the largest worker peak on the large set over that on the small set (flat is 1.0: a
  worker holds one shard at a time, whatever the dataset size).

Targets (issue #18): speed-up >= 1.7x, flat memory. Last line: ``speedup=<x> rss_growth=<ratio>``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import finish, long_lived_server

WORKER_MARK = "spawn_main"  # how a Dask worker process (multiprocessing spawn) shows in its command line


class WorkerPeaks:
    """Peak resident set of every worker process below this one, sampled while the block runs."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s = every_s
        self.peaks: dict[int, int] = {}  # pid -> VmHWM bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> WorkerPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            for proc in me.children(recursive=True):
                try:
                    if WORKER_MARK not in " ".join(proc.cmdline()):
                        continue
                    peak = _vm_hwm(proc.pid)
                except (psutil.Error, OSError):
                    continue
                if peak:
                    self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), peak)
            self._stop.wait(self.every_s)


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def config(tmp: Path, results: Path, workers: int, images: int, steps: int) -> Any:
    from tasks.config import parse_config

    name = f"scaling-w{workers}-n{images}"
    return parse_config(
        {
            "name": name,
            "dataset": {"name": "fashion_scenes", "params": {"split": "test"}, "limit": images},
            "model": {"name": "drn_tiny_seg"},
            "attacks": [{"name": "clean"}],
            "defenses": [{"name": "equivariance", "steps": steps, "eval_draws": 1}],
            "shard_size": 4,
            "batch_size": 4,
            "seed": 0,
            "cache_dir": str(tmp / f"{name}-cache"),
            "results_dir": str(results),
            "cluster": {"n_workers": workers, "torch_threads": 1},
        }
    )


def compute_span(api_url: str) -> tuple[float, float]:
    """(first task start to last task end, sum of task durations) of the server's latest flow run, in seconds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        latest = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[latest.id])))
    starts = [t.start_time for t in tasks if t.start_time]
    ends = [t.end_time for t in tasks if t.end_time]
    total = sum(t.total_run_time.total_seconds() for t in tasks)
    return (max(ends) - min(starts)).total_seconds(), total


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--small", type=int, default=8, help="scenes of the small set (the large set has 4x)")
    p.add_argument("--steps", type=int, default=6, help="equivariance defense steps")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # before Prefect is imported: its INFO lines per task
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows import pipeline

    large = 4 * args.small
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="equi-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        results = tmp / "results"
        with long_lived_server(results) as server:
            for workers, images in ((1, large), (2, large), (2, args.small)):
                cfg = config(tmp, results, workers, images, args.steps)
                started = time.perf_counter()
                with WorkerPeaks() as peaks:
                    summary = pipeline.run(cfg)
                wall = time.perf_counter() - started
                if not summary.ok:
                    raise SystemExit(f"{cfg.name}: failed shards {summary.failed}")
                span, task_total = compute_span(server.api_url)
                peak_mb = [round(v / 2**20) for v in peaks.peaks.values()]
                rows.append(
                    {
                        "workers": workers,
                        "images": images,
                        "shards": summary.n_shards,
                        "wall_s": wall,
                        "span_s": span,
                        "task_s": task_total,
                        "worker_peak_mb": peak_mb,
                    }
                )
                print(
                    f"{workers} worker(s), {images:>3} scenes ({summary.n_shards} shards): wall {wall:6.1f} s, "
                    f"compute span {span:6.1f} s (tasks {task_total:6.1f} s), worker peak RSS {peak_mb} MB",
                    flush=True,
                )
    one, two, small = rows
    speedup = one["span_s"] / two["span_s"]
    rss_growth = max(two["worker_peak_mb"]) / max(small["worker_peak_mb"])
    print(
        f"workload: fashion_scenes test, drn_tiny_seg, clean + equivariance ({args.steps} steps), shards of 4; "
        f"{args.small} vs {large} scenes"
    )
    print(f"speed-up 2 vs 1 worker {speedup:.2f}x (wall {one['wall_s'] / two['wall_s']:.2f}x; target >= 1.7x)")
    print(
        f"largest worker peak RSS: {max(small['worker_peak_mb'])} MB on {args.small} scenes, "
        f"{max(two['worker_peak_mb'])} MB on {large}: growth {rss_growth:.2f}x (target: flat)"
    )
    out = {"runs": rows, "speedup": speedup, "rss_growth": rss_growth}
    return finish(out, args.json_out, f"speedup={speedup:.2f} rss_growth={rss_growth:.2f}")


if __name__ == "__main__":
    main()
