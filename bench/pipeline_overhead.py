"""Start-up overhead of a run through Prefect + Dask against the same work in process (issue #18).

    python -m bench.pipeline_overhead                 # 2 repetitions: the fashion demo config on 16 images
    python -m bench.pipeline_overhead --reps 3 --json out.json
    python -m bench.pipeline_overhead --code DIR      # the runs use another checkout's code
    python -m bench.pipeline_overhead --code BEFORE --code .   # both checkouts, interleaved in one run

Each repetition runs three fresh ``equi run`` processes, interleaved (the order rotates with the repetition); with
several ``--code`` checkouts, each mode runs once per checkout, one after the other (that order rotates too), and
each checkout has a server and warm workers of its own:

- **in process**: ``--in-process``;
- **warm**: while a long-lived ``equi server`` with N warm Dask workers runs for the results directory (the nightly
  set-up: ``equi server start --workers N``; the bench starts it once with that machinery, untimed, and stops it at
  the end), so the run submits to its warm cluster;
- **cold**: ``--workers N`` with no server: the run starts a temporary Prefect API.

A warm-up round of the three modes runs first, untimed (``--warmup``): the first process of a bench pays for cold
file caches and, on the warm cluster, its workers' first run (each builds the runtime and imports what a task
imports lazily); the nightly set-up runs many configs on the same warm workers. Every run has a cache directory and
a run name of its own, so nothing is cached or already done: the warm runs share the server's results directory
(that is how a run finds the server), the others get fresh ones. The runs' results
tables are compared (in process and Dask must agree exactly). Times are wall seconds of the whole process, Python's
start-up and imports included, as a user sees them.

Printed: each run's wall time, the median per mode, the warm ratio (warm / in process) and the cold start-up (cold
minus in process). Targets of the issue: warm <= 1.15x, cold start-up <= 15 s. The last line is
``overhead=<warm ratio> cold_startup_s=<seconds>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import finish, long_lived_server

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo" / "01_fashion_cnn.yaml"
MODES = ("in_process", "warm", "cold")


def workload(source: Path, images: int, steps: int | None, name: str) -> dict[str, Any]:
    """The demo config on its first ``images`` images, every attack's and defense's ``steps`` capped at ``steps``
    (None: as the demo has them), under ``name``; where it runs is left to the command line."""
    data = yaml.safe_load(source.read_text())
    data["name"] = name
    data["dataset"] = {**data["dataset"], "limit": images}
    data.pop("cluster", None)
    if steps is not None:
        for entry in [*data.get("attacks", []), *data.get("defenses", [])]:
            if isinstance(entry, dict) and "steps" in entry:
                entry["steps"] = min(int(entry["steps"]), steps)
    return data


def child_env(code: Path) -> dict[str, str]:
    """The environment of a run: the chosen code, no Prefect server named (a warm run finds the `equi server` of its
    results directory by itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "EQUI_RESULTS_DIR")}
    env.update(PYTHONPATH=str(code), PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="200")
    return env


def run_flags(mode: str, workers: int, warm_cluster: bool) -> list[str]:
    """Where a run executes: a warm run on the server's warm cluster chooses nothing (a cluster setting of its own
    would start its own cluster)."""
    if mode == "in_process":
        return ["--in-process"]
    return [] if mode == "warm" and warm_cluster else ["--workers", str(workers)]


def timed_run(code: Path, config: Path, results: Path, cache: Path, flags: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "flows.cli", "run", str(config), "--results-dir", str(results)]
    cmd += ["--cache-dir", str(cache), "--no-report", *flags]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=code, env=child_env(code), capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{output[-3000:]}")
    return seconds, output


def table(results: Path, run_id: str) -> list[tuple]:
    from storage.results import read_results_table

    rows = read_results_table(results, run_id).to_pylist()
    return sorted((r["attack"], r["defense"], r["metric"], r["value"], r["n_samples"]) for r in rows)


def run_id_of(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("run ") and ": " in line:
            return line.split()[1].rstrip(":")
    raise SystemExit(f"no run id in the output:\n{output[-2000:]}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--reps", type=int, default=2, help="repetitions of the three modes (medians are reported)")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed rounds of the three modes first (file caches, compiled bytecode, the warm workers' first run)",
    )
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=0, help="cap on attack and defense steps (0: the demo's own)")
    p.add_argument("--workers", type=int, default=2, help="local Dask workers of the warm and cold runs")
    p.add_argument("--config", type=Path, default=DEMO)
    p.add_argument(
        "--code",
        type=Path,
        action="append",
        default=None,
        help="checkout whose code the runs use (default this one); repeat it to compare checkouts in one run",
    )
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.images < 1 or args.workers < 1:
        p.error("--reps, --images and --workers must be >= 1, --warmup >= 0")
    codes = [c.resolve() for c in (args.code or [REPO])]
    if len(set(codes)) != len(codes):
        p.error("--code: each checkout once")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="equi-overhead-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        servers = {}
        for c, code in enumerate(codes):
            # A checkout from before the warm cluster gets a server without one, as `equi server start` had.
            workers = args.workers if (code / "flows" / "warm_cluster.py").exists() else 0
            warm_results = tmp / f"warm-results-{c}"
            server = stack.enter_context(long_lived_server(warm_results, workers, cwd=code))
            servers[c] = (server, warm_results, workers)
        for rep in range(-args.warmup, args.reps):  # negative: a warm-up round, printed, not counted
            for mode in MODES[rep % 3 :] + MODES[: rep % 3]:
                order = list(range(len(codes)))
                for c in order[rep % len(codes) :] + order[: rep % len(codes)]:
                    server, warm_results, workers = servers[c]
                    tag = f"{rep}" if rep >= 0 else f"warmup{-rep}"
                    name = f"overhead-{mode.replace('_', '-')}-{tag}" + (f"-code{c}" if len(codes) > 1 else "")
                    config = tmp / f"{name}.yaml"
                    config.write_text(yaml.safe_dump(workload(args.config, args.images, args.steps or None, name)))
                    results = warm_results if mode == "warm" else tmp / f"{name}-results"
                    flags = run_flags(mode, args.workers, warm_cluster=bool(workers))
                    seconds, output = timed_run(codes[c], config, results, tmp / f"{name}-cache", flags)
                    run_id = run_id_of(output)
                    runs.append(
                        {
                            "code": str(codes[c]),
                            "rep": rep,
                            "mode": mode,
                            "seconds": seconds,
                            "run_id": run_id,
                            "used_server": server.api_url in output and "equi server" in output,
                            "used_warm_cluster": "using the warm Dask cluster of `equi server`" in output,
                            "table": table(results, run_id),
                        }
                    )
                    which = f"rep {rep}" if rep >= 0 else "warm-up"
                    print(f"{which} {mode:<10} {seconds:7.1f} s  ({run_id}; code {codes[c]})", flush=True)
    tables = {json.dumps(r.pop("table")) for r in runs}
    print(
        f"workload: {args.config.name}, {args.images} images, steps capped at {args.steps or 'the demo values'}; "
        f"{args.workers} workers; {args.reps} repetition(s) after {args.warmup} warm-up round(s)"
    )
    per_code = {}
    for code in codes:
        timed = [r for r in runs if r["rep"] >= 0 and r["code"] == str(code)]
        median = {m: statistics.median(r["seconds"] for r in timed if r["mode"] == m) for m in MODES}
        warm = [r for r in timed if r["mode"] == "warm"]
        per_code[str(code)] = {
            "median_s": median,
            "warm_ratio": median["warm"] / median["in_process"],
            "cold_startup_s": median["cold"] - median["in_process"],
            "warm_used_server": all(r["used_server"] for r in warm),
            "warm_used_cluster": all(r["used_warm_cluster"] for r in warm),
        }
        f = per_code[str(code)]
        print(f"code {code}:")
        for m in MODES:
            print(f"  median {m:<10} {median[m]:7.1f} s")
        print(f"  warm runs used the running `equi server`: {'yes' if f['warm_used_server'] else 'no'}")
        print(f"  warm runs used its warm Dask cluster: {'yes' if f['warm_used_cluster'] else 'no'}")
        print(
            f"  warm / in process {f['warm_ratio']:.2f}x (target <= 1.15x); cold start-up {f['cold_startup_s']:.1f} s "
            "(target <= 15 s)"
        )
    print(f"results tables identical across all runs: {'yes' if len(tables) == 1 else 'NO'}")
    last = per_code[str(codes[-1])]
    out = {"runs": runs, "codes": per_code, **{k: last[k] for k in ("median_s", "warm_ratio", "cold_startup_s")}}
    label = "" if len(codes) == 1 else " (the last --code)"
    print(f"figures of the last line{label}: {codes[-1]}")
    return finish(out, args.json_out, f"overhead={last['warm_ratio']:.2f} cold_startup_s={last['cold_startup_s']:.1f}")


if __name__ == "__main__":
    main()
