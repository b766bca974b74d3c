"""Wall time of the CLI's quick commands, each a fresh ``equi`` process as a user types it.

    python -m bench.cli_latency              # 5 repeats each, median and max printed
    python -m bench.cli_latency --repeats 9 --json out.json

Makes one small finished run in a temporary folder first (in process, MNIST fixture digits, 5 images), then times
``equi --help``, ``equi status``, ``equi status RUN``, ``equi query``, ``equi report RUN``, ``equi list models``, the
HTML report (not counted among the quick commands: a run with plots or example grids imports matplotlib), a
config with a typo (caught by the static pass, no torch) and a config whose error needs the engine (``eps: -4``,
which imports torch to build the attack). The machine is shared and noisy: compare the figures with each other, in
one run. The last line is ``max_read_only_s=<slowest median of the read-only commands and the typo>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
EQUI = [sys.executable, "-m", "flows.cli"]


def _finished_run(tmp: Path) -> tuple[Path, str, Path]:
    sys.path.insert(0, str(REPO))
    from flows import pipeline
    from tasks.config import parse_config
    from tests.pipeline_helpers import tiny_config

    data = tiny_config(tmp, name="latency", cluster={"in_process": True, "torch_threads": 1})
    data["dataset"]["limit"] = 5
    data["defenses"] = [{"name": "vanilla"}]
    cfg = parse_config(data)
    assert pipeline.run(cfg).ok
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, cfg.run_id(), Path(cfg.results_dir)


def _time(args: list[str], cwd: Path, expect: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    done = subprocess.run([*EQUI, *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != expect:
        raise SystemExit(f"equi {' '.join(args)}: exit {done.returncode}, expected {expect}: {done.stderr[-400:]}")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        config, run_id, results = _finished_run(tmp)
        data = yaml.safe_load(config.read_text())
        typo, engine = tmp / "typo.yaml", tmp / "engine.yaml"
        typo.write_text(yaml.safe_dump({**data, "attacks": [{"name": "pgdd", "eps": 4}]}))
        engine.write_text(yaml.safe_dump({**data, "attacks": [{"name": "pgd", "eps": -4}]}))
        r = ["-r", str(results)]
        commands = {
            "equi --help": (["--help"], 0, True),
            "equi status": (["status", *r], 0, True),
            "equi status RUN": (["status", run_id, *r], 0, True),
            "equi query SQL": (["query", "select attack, defense, value from results", *r], 0, True),
            "equi report RUN": (["report", run_id, *r], 0, True),
            "equi list models": (["list", "models"], 0, True),
            "equi report RUN -f html": (
                ["report", run_id, *r, "-f", "html", "-o", str(tmp / "r.html")],
                0,
                False,
            ),
            "bad config: a typo (static pass)": (["run", str(typo)], 2, True),
            "bad config: eps -4 (engine check)": (["run", str(engine)], 2, False),
        }
        rows = {}
        for name, (args, code, quick) in commands.items():
            times = [_time(args, tmp, code) for _ in range(a.repeats)]
            rows[name] = {"median_s": statistics.median(times), "max_s": max(times), "quick": quick}
    width = max(len(n) for n in rows)
    print(f"{'command':<{width}}  median_s  max_s   (n={a.repeats} each, load {os.getloadavg()[0]:.1f})")
    for name, row in rows.items():
        print(f"{name:<{width}}  {row['median_s']:8.2f}  {row['max_s']:5.2f}")
    worst = max(row["median_s"] for row in rows.values() if row["quick"])
    out = {"repeats": a.repeats, "rows": rows, "max_read_only_s": worst}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    print(f"max_read_only_s={worst:.2f}")
    return out


if __name__ == "__main__":
    main()
