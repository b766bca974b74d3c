"""Wall time of the built-in benchmark through the full pipeline (local Dask cluster, Zarr cache, Parquet results),
from empty cache and results directories, after set-up and data preparation.

    python -m bench.pipeline_wall                  # the demo (configs/demo), as `equi demo` runs it
    python -m bench.pipeline_wall --full --fraction 0.05
        # the full benchmark (configs/benchmark) on the first 5% of each dataset; the full figure is extrapolated
        # linearly from that and printed as an estimate, not a measurement

Prints seconds per config, the total, and for the demo whether it met the 10-minute target.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from equicore.datasets import prepare
from equicore.registry import DATASETS
from flows.pipeline import run_many
from tasks.config import load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--full", action="store_true", help="configs/benchmark instead of configs/demo")
    p.add_argument("--fraction", type=float, default=1.0, help="run this fraction of each dataset (and extrapolate)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    prepare(log=lambda m: None)
    folder = REPO / "configs" / ("benchmark" if args.full else "demo")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfgs = []
        for path in sorted(folder.glob("*.yaml")):
            data = load_config(path).model_dump(mode="json")
            data["cache_dir"], data["results_dir"] = f"{tmp}/cache", f"{tmp}/results"
            n_total = data["dataset"]["limit"] or len(
                DATASETS.build(data["dataset"]["name"], **data["dataset"]["params"])
            )
            n_run = n_total if args.fraction >= 1 else max(data["batch_size"], math.ceil(args.fraction * n_total))
            data["dataset"]["limit"] = min(n_total, n_run)
            cfgs.append((path.name, parse_config(data, str(path)), n_total))
        t0 = time.perf_counter()
        last = t0
        for (name, _cfg, n_total), summary in zip(cfgs, run_many([c for _, c, _ in cfgs], args.workers), strict=True):
            now = time.perf_counter()
            rows.append(
                {
                    "config": name,
                    "samples": summary.n_samples,
                    "of": n_total,
                    "seconds": now - last,
                    "failed": len(summary.failed),
                }
            )
            last = now
        total = time.perf_counter() - t0
    for r in rows:
        est = r["seconds"] * r["of"] / r["samples"]
        extra = f"  (full {r['of']}: ~{est / 3600:.2f} h, extrapolated)" if r["samples"] < r["of"] else ""
        print(f"{r['config']:<36} {r['samples']:>6} samples {r['seconds']:>8.1f} s{extra}")
    print(f"total wall time {total:.1f} s ({total / 60:.1f} min), cluster start included")
    if not args.full:
        print(f"demo target 10 min: {'met' if total <= 600 else 'NOT met'}")
    out = {"configs": rows, "total_s": total, "full": args.full, "fraction": args.fraction}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
