"""Throughput of the batched equivariance defense against the faithful per-view loop, in one run.

Both modes purify the same images with the same seeds and view draws (paper views, K=8, T=20 by default):
``batched=True`` runs all views of equal size in one forward/backward together with the reference F(x);
``batched=False`` runs one forward per view plus one for the reference. Prints images/s of each mode, the ratio,
whether the purified images are equal (max |diff|, fraction of identical pixels) and the peak memory of each mode
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS sampled in a thread, and the ``ru_maxrss`` delta).

    python -m bench.defense_batching                       # drn_tiny_seg, 8 x 3 x 96 x 96, K=8, T=20
    python -m bench.defense_batching --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import equicore  # noqa: F401  (registers models, defenses, transforms)
from equicore.adapters import SegmentationAdapter
from equicore.defenses import ConsistencyDefense, build_defense
from equicore.equivariance import view_features
from equicore.registry import MODELS

try:  # psutil comes with dask.distributed; without it only ru_maxrss is reported on CPU
    import psutil
except ImportError:  # pragma: no cover
    psutil = None


@dataclass
class ModeResult:
    mode: str
    seconds: list[float] = field(default_factory=list)
    images_per_s: float = 0.0
    forwards_per_step: int = 0
    peak_mem_mb: float | None = None  # CUDA max_memory_allocated or sampled peak RSS, above the baseline
    ru_maxrss_delta_mb: float | None = None  # CPU only; 0 once an earlier phase set a higher process peak


class PeakMemory:
    """Peak memory of a code block above its starting point."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device, self.interval_s = device, interval_s
        self.peak_mb: float | None = None
        self.ru_delta_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._stop = threading.Event()
        if psutil is not None:
            proc = psutil.Process()
            self._base = self._max = proc.memory_info().rss

            def sample() -> None:
                while not self._stop.is_set():
                    self._max = max(self._max, proc.memory_info().rss)
                    self._stop.wait(self.interval_s)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        self._stop.set()
        if psutil is not None:
            self._thread.join()
            self.peak_mb = (self._max - self._base) / 2**20
        # ru_maxrss is in KiB on Linux, bytes on macOS.
        scale = 1 if sys.platform == "darwin" else 1024
        self.ru_delta_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._ru0) * scale / 2**20


def build_model(name: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    # Same random weights in every process (modes run in separate processes and their outputs are compared).
    torch.manual_seed(0)
    if name in MODELS:
        return MODELS.build(name).to(device).eval(), name
    if name not in ("drn_tiny_seg", "local_drn"):
        MODELS.get(name)  # raises UnknownNameError with the known names
    from bench.models import LocalDRN

    return LocalDRN().to(device).eval(), "local_drn (bench/models.py)"


def make_inputs(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """Smooth random scenes (blurred noise) rather than white noise: closer to real images' gradients."""
    g = torch.Generator().manual_seed(1234)
    x = torch.rand(batch, 3, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(
    defense: ConsistencyDefense,
    adapter: SegmentationAdapter,
    x: torch.Tensor,
    seeds: list[int],
    result: ModeResult,
) -> torch.Tensor:
    with PeakMemory(x.device) as mem:
        sync(x.device)
        t0 = time.perf_counter()
        out = defense.purify(adapter, x, seeds)
        sync(x.device)
        result.seconds.append(time.perf_counter() - t0)
    # Keep the largest peak seen over repeats.
    if mem.peak_mb is not None:
        result.peak_mem_mb = max(result.peak_mem_mb or 0.0, mem.peak_mb)
    if mem.ru_delta_mb is not None:
        result.ru_maxrss_delta_mb = max(result.ru_maxrss_delta_mb or 0.0, mem.ru_delta_mb)
    return out


def profile_step(defense: ConsistencyDefense, adapter: SegmentationAdapter, x: torch.Tensor, rows: int) -> str:
    """Top operators of one objective forward+backward (what one defense step costs)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
    xr = x.clone().requires_grad_(True)
    with profile(activities=activities) as prof:
        score = defense.score(adapter, xr, 0)
        torch.autograd.grad(score.sum(), xr)
        sync(x.device)
    key = "self_cuda_time_total" if x.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="drn_tiny_seg", help="a segmentation model in MODELS, or local_drn")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--steps", type=int, default=20, help="defense steps T")
    p.add_argument("--views", default="paper", help="view set (paper: K=8)")
    p.add_argument("--eps", type=float, default=8.0, help="attack eps (/255); eps_v = 1.5 * eps")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per mode (the best is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--max-batch-pixels", type=int, default=None, help="memory cap of the batched mode")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print the top ROWS ops of one step")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run both modes in this process (default: one fresh process per mode, so that the second mode does "
        "not reuse memory the first one left in the allocator and both peak-memory figures are comparable)",
    )
    p.add_argument("--json", dest="json_out", default=None, help="write the figures to this file")
    p.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)  # child process: one mode
    p.add_argument("--out-tensor", default=None, help=argparse.SUPPRESS)  # child process: purified images
    return p.parse_args(argv)


# per_view_loop: one forward per view (+ one for the reference) on the same batch; official_batch1: the same loop
# run one image at a time, as the official code is run (batch size 1, paper section 4.4).
MODES = ("batched", "per_view_loop", "official_batch1")


class OneAtATime:
    """Purify image by image (per-sample seeds make the result identical to a batched call)."""

    def __init__(self, defense: ConsistencyDefense) -> None:
        self.defense = defense

    def purify(self, adapter, x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        return torch.cat([self.defense.purify(adapter, x[i : i + 1], seeds[i : i + 1]) for i in range(x.shape[0])])


class Bench:
    """Model, inputs and defenses of one configuration."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.device = torch.device(args.device)
        model, self.model_name = build_model(args.model, self.device)
        self.adapter = SegmentationAdapter(model)
        self.x = make_inputs(args.batch, args.size, self.device)
        self.seeds = list(range(args.batch))

    def defense(self, mode: str, steps: int | None = None) -> ConsistencyDefense:
        a = self.args
        d = build_defense(
            "equivariance",
            steps=steps or a.steps,
            views=a.views,
            batched=mode == "batched",
            max_batch_pixels=a.max_batch_pixels,
        )
        return d.with_attack_eps(a.eps)  # type: ignore[return-value]

    def run(self, mode: str) -> tuple[ModeResult, torch.Tensor]:
        result = ModeResult(mode)
        d = self.defense(mode)
        params = d.view_params(0, (self.args.size, self.args.size))
        result.forwards_per_step = view_features(
            self.adapter.features, self.x, d._views, params, batched=d.batched, max_batch_pixels=d.max_batch_pixels
        ).forwards
        self.defense(mode, steps=1).purify(self.adapter, self.x, self.seeds)  # warm-up: kernel selection, caches
        out = self.x
        for _ in range(self.args.repeats):
            if mode == "official_batch1":
                out = run_mode(OneAtATime(d), self.adapter, self.x, self.seeds, result)
            else:
                out = run_mode(d, self.adapter, self.x, self.seeds, result)
        result.images_per_s = self.args.batch / min(result.seconds)
        return result, out


def run_child(mode: str, argv: list[str]) -> tuple[ModeResult, torch.Tensor]:
    """One mode in a fresh interpreter; returns its figures and purified images."""
    with tempfile.TemporaryDirectory() as tmp:
        out_t, out_j = os.path.join(tmp, "x.pt"), os.path.join(tmp, "r.json")
        cmd = [sys.executable, "-m", "bench.defense_batching", *argv, "--mode", mode, "--out-tensor", out_t]
        subprocess.run([*cmd, "--json", out_j], check=True, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
        with open(out_j) as f:
            data = json.load(f)
        return ModeResult(**data), torch.load(out_t, weights_only=True)


def strip_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """Drop ``--flag value`` / ``--flag=value`` pairs a child must not inherit."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.mode is not None:  # child: one mode, figures and images to files
        result, out = Bench(args).run(args.mode)
        torch.save(out.cpu(), args.out_tensor)
        with open(args.json_out, "w") as f:
            json.dump(asdict(result), f)
        return None

    bench = Bench(args)
    results: dict[str, ModeResult] = {}
    outputs: dict[str, torch.Tensor] = {}
    child_argv = strip_flags(argv, ("--json", "--profile"))
    for mode in MODES:
        if args.in_process:
            results[mode], outputs[mode] = bench.run(mode)
        else:
            results[mode], outputs[mode] = run_child(mode, child_argv)
        outputs[mode] = outputs[mode].to(bench.device)

    a, b, c = outputs["batched"], outputs["per_view_loop"], outputs["official_batch1"]
    with torch.no_grad():
        scorer = bench.defense("batched")
        score_a, score_b = scorer.score(bench.adapter, a), scorer.score(bench.adapter, b)
    device = bench.device
    summary: dict[str, Any] = {
        "model": bench.model_name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "processes": "one per mode" if not args.in_process else "shared",
        "batch": args.batch,
        "size": args.size,
        "views": args.views,
        "K": len(scorer._views),
        "T": args.steps,
        "eps_v": 1.5 * args.eps,
        "modes": {n: asdict(r) for n, r in results.items()},
        "speedup": results["batched"].images_per_s / results["per_view_loop"].images_per_s,
        "speedup_vs_official_batch1": results["batched"].images_per_s / results["official_batch1"].images_per_s,
        "official_max_abs_diff": float((a - c).abs().max()),
        "official_identical_fraction": float((a == c).float().mean()),
        "max_abs_diff": float((a - b).abs().max()),
        "identical_fraction": float((a == b).float().mean()),
        "score_max_abs_diff": float((score_a - score_b).abs().max()),
    }
    print(report(summary))
    if args.profile:
        for mode in MODES[:2]:
            print(f"\n--- one objective forward+backward, {mode} ---")
            print(profile_step(bench.defense(mode), bench.adapter, bench.x, args.profile))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def report(s: dict[str, Any]) -> str:
    lines = [
        f"equivariance defense: {s['model']} on {s['device']} ({s['threads']} threads, {s['processes']} process), "
        f"batch {s['batch']} x 3 x "
        f"{s['size']} x {s['size']}, views={s['views']} (K={s['K']}), T={s['T']}, eps_v={s['eps_v']:g}/255",
        f"{'mode':<15}{'images/s':>10}{'best s':>9}{'fwd/step':>10}{'peak MB':>10}{'ru_maxrss dMB':>15}",
    ]
    for name, r in s["modes"].items():
        peak = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        ru = f"{r['ru_maxrss_delta_mb']:.0f}" if r["ru_maxrss_delta_mb"] is not None else "-"
        lines.append(
            f"{name:<15}{r['images_per_s']:>10.3f}{min(r['seconds']):>9.2f}{r['forwards_per_step']:>10}"
            f"{peak:>10}{ru:>15}"
        )
    lines.append(f"speedup batched / per-view loop (same batch): {s['speedup']:.2f}x")
    lines.append(f"speedup batched / official per-view loop at batch 1: {s['speedup_vs_official_batch1']:.2f}x")
    lines.append(
        f"outputs: max |diff| {s['max_abs_diff']:.3g}, identical pixels {100 * s['identical_fraction']:.3f}%, "
        f"score max |diff| {s['score_max_abs_diff']:.2g}; vs batch-1 loop: max |diff| "
        f"{s['official_max_abs_diff']:.3g}, identical pixels {100 * s['official_identical_fraction']:.3f}%"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
