"""What sharing the "before" equivariance measure across defenses saves: the defend phase of a demo config, in process,
with the shared path (``storage.measure_cache``) and without it (every defense measures its own input, as before),
interleaved in one run. The attacks are computed once first and read from the cache by every timed run, so the timed
work is the defend phase (purify, predict, measure, score) plus the reduce step.

    python -m bench.shared_measure                          # configs/demo/02 (drn_tiny_seg), 8 scenes, 2 rounds
    python -m bench.shared_measure --config configs/demo/01_fashion_cnn.yaml --limit 32 --rounds 3

Prints per mode the median wall time and the number of measure calls, then the tables' equality (every per-image
row and results value, exactly) and, last, ``speedup=<without / with>``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flows import pipeline
from storage.measure_cache import MeasureCache
from storage.query import query
from tasks import shard_steps
from tasks.config import load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
SAMPLES_SQL = "select * exclude (run_id) from samples order by attack, defense, sample_id"


def _config(path: Path, limit: int, cache: Path, results: Path):
    data = load_config(path).model_dump(mode="json")
    data["dataset"]["limit"] = limit
    data["cluster"] = {**data.get("cluster", {}), "in_process": True, "torch_threads": 1, "address": None}
    data["cache_dir"], data["results_dir"] = str(cache), str(results)
    return parse_config(data, str(path))


def _timed_run(cfg, shared: bool, calls: list[int]) -> float:
    original_read, original_measure = MeasureCache.read, shard_steps.equivariance_scores

    def counted(rt, x):
        calls.append(int(x.shape[0]))
        return original_measure(rt, x)

    shard_steps.equivariance_scores = counted
    if not shared:
        MeasureCache.read = lambda self, key, shard, ids: None  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        assert pipeline.run(cfg).ok
        return time.perf_counter() - t0
    finally:
        MeasureCache.read, shard_steps.equivariance_scores = original_read, original_measure  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo" / "02_fashion_scenes_seg.yaml"))
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    path = Path(args.config)
    times: dict[str, list[float]] = {"shared": [], "own": []}
    measures: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        pipeline.run(_config(path, args.limit, cache, Path(tmp) / "warm"))  # attacks cached once
        last: dict[str, str] = {}
        for r in range(args.rounds):
            for mode in ("own", "shared") if r % 2 == 0 else ("shared", "own"):
                results = Path(tmp) / f"{mode}-{r}"
                for d in (cache / "measures").glob("*"):  # every timed run starts without shared scores
                    for f in d.glob("*"):
                        f.unlink()
                calls: list[int] = []
                times[mode].append(_timed_run(_config(path, args.limit, cache, results), mode == "shared", calls))
                measures[mode] = len(calls)
                last[mode] = str(results)
                print(f"round {r} {mode}: {times[mode][-1]:.1f} s, {len(calls)} measure calls", flush=True)
        a = query(last["shared"], SAMPLES_SQL).to_pylist()
        b = query(last["own"], SAMPLES_SQL).to_pylist()
        identical = repr(a) == repr(b)
    med = {m: statistics.median(t) for m, t in times.items()}
    speedup = med["own"] / med["shared"]
    print(f"config {path.name}, {args.limit} images, in process, 1 thread, {args.rounds} rounds (medians)")
    print(f"without sharing: {med['own']:.1f} s ({measures['own']} measure calls)")
    print(f"with sharing:    {med['shared']:.1f} s ({measures['shared']} measure calls)")
    print(f"per-image rows identical: {identical} ({len(a)} rows)")
    print(f"speedup={speedup:.3f}")
    return {"median_s": med, "measure_calls": measures, "identical": identical, "speedup": speedup}


if __name__ == "__main__":
    main()
