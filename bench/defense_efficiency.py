"""Achieved GFLOP/s of the equivariance defense's ``purify``, as a fraction of single-thread sgemm, plain and
optimized model graph (``model.graph``), on the demo's two models.

What runs is what the pipeline runs: the runtime of ``configs/demo/02_fashion_scenes_seg.yaml`` (``drn_tiny_seg``
on the first ``batch_size`` = 4 fashion_scenes TEST scenes, 96 x 96) and of ``configs/demo/01_fashion_cnn.yaml``
(``fashion_cnn`` on the first 16 fashion_mnist TEST images, feature layer ``features.block2``), built by
``tasks.runtime.build_runtime`` with the shipped weights, once with ``model.graph: plain`` and once with
``optimized``; the defense is those configs' ``equivariance`` entry (paper views K=8, T=10 steps, one draw) resolved
at the configs' eps (8/255, so eps_v = 12/255), as the pipeline resolves it.

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one ``purify`` call (every step's forward and backward
  w.r.t. the input; it counts convolutions and matrix products, not elementwise ops), per model and graph. That
  call is also the warm-up.
- Time: wall time of one ``purify`` call. Everything runs on one thread (``torch.set_num_threads(1)``).
- Peak: single-thread sgemm, ``torch.mm`` of two 1024 x 1024 float32 matrices (2 * 1024^3 FLOPs per call, the mean
  of ``--mm-repeats`` calls per sample), measured in the same run.
- Rounds: per round and model, sgemm, purify plain, purify optimized, interleaved so that load from other jobs hits
  all of them alike; ``--rounds`` (3) rounds, medians reported.

- The model passes alone: the feature extractor on inputs of the shapes one purify call fed it (recorded during the
  FLOP count), forward and backward w.r.t. the input, nothing else (no views, objective, noise or update), timed in
  the same rounds. Its efficiency is the bound of any implementation of the defense with this model and this
  convolution library; "purify reaches" = its seconds / purify's seconds.

efficiency = (FLOPs / median purify seconds) / median sgemm FLOP/s; speed-up = plain seconds / optimized seconds.
The last line printed is ``efficiency=<ratio>``, the ``drn_tiny_seg`` OPTIMIZED-graph efficiency.

    python -m bench.defense_efficiency                  # 3 rounds, ~2-3 minutes on a 2-core CPU
    python -m bench.defense_efficiency --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
# (model, demo config): the defense and batch those configs run.
CASES = (
    ("drn_tiny_seg", REPO / "configs" / "demo" / "02_fashion_scenes_seg.yaml"),
    ("fashion_cnn", REPO / "configs" / "demo" / "01_fashion_cnn.yaml"),
)
GRAPHS = ("plain", "optimized")
HEADLINE = ("drn_tiny_seg", "optimized")  # the figure on the last line
CLOSE = 1e-3  # purified pixels within this of the plain graph's count as agreeing (a defense step moves 2 eps_v)


@dataclass
class Setting:
    """One model under one graph setting."""

    model: str
    graph: str
    batch: int
    flops: int = 0
    seconds: list[float] = field(default_factory=list)
    passes_seconds: list[float] = field(default_factory=list)  # the model passes alone (Case.passes_alone)
    passes_flops: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def gflops(self) -> float:
        return self.flops / self.median_s / 1e9


class Case:
    """The runtime, images and defense of one demo config under one graph setting."""

    def __init__(self, model: str, config: Path, graph: str, steps: int | None) -> None:
        from tasks.config import load_config
        from tasks.runtime import build_runtime

        cfg = load_config(config, sets=[f"model.graph={graph}"], device="cpu")
        if cfg.model.name != model:
            raise SystemExit(f"{config} runs model {cfg.model.name!r}, expected {model!r}")
        self.rt = build_runtime(cfg)
        self.x, _, _ = self.rt.batch(self.rt.indices[: cfg.batch_size])
        self.seeds = list(range(cfg.batch_size))
        (entry,) = [d for d in cfg.defenses if d.name == "equivariance"]
        params = entry.params() if steps is None else {**entry.params(), "steps": steps}
        from equicore.defenses import build_defense

        self.defense = build_defense(entry.name, **params).with_attack_eps(cfg.resolved_reference_eps())
        self.pass_shapes: list[tuple[int, ...]] = []  # the batches one purify call feeds the model (count_flops)

    def purify(self) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        out = self.defense.purify(self.rt.adapter, self.x, self.seeds)
        return out, time.perf_counter() - t0

    def count_flops(self) -> tuple[int, torch.Tensor]:
        """FLOPs of one purify call (also the warm-up); records the batch shapes its model passes see."""
        adapter = self.rt.adapter
        features = adapter.features
        self.pass_shapes = []

        def recording(x: torch.Tensor) -> torch.Tensor:
            self.pass_shapes.append(tuple(x.shape))
            return features(x)

        adapter.features = recording  # type: ignore[method-assign]
        try:
            with FlopCounterMode(display=False) as counter:
                out, _ = self.purify()
        finally:
            del adapter.features  # the class's method again
        return counter.get_total_flops(), out

    def _run_passes(self, inputs: list[torch.Tensor]) -> None:
        for x in inputs:
            leaf = x.clone().requires_grad_(True)
            # through one op, as purify's passes are (the views are computed from the image, never leaves)
            torch.autograd.grad(self.rt.adapter.features(leaf * 1.0).sum(), leaf)

    def pass_inputs(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return [torch.rand(shape, generator=g) for shape in self.pass_shapes]

    def count_pass_flops(self) -> int:
        """FLOPs of the model passes alone (:meth:`passes_alone`), counted once; also their warm-up."""
        with FlopCounterMode(display=False) as counter:
            self._run_passes(self.pass_inputs())
        return counter.get_total_flops()

    def passes_alone(self) -> float:
        """Seconds of the model passes of one purify call and nothing else: the same feature extractor on inputs of the
        same shapes, forward and backward w.r.t. the input, no views, objective or update; the bound any
        implementation of the defense reaches with this model and convolution library."""
        inputs = self.pass_inputs()
        t0 = time.perf_counter()
        self._run_passes(inputs)
        return time.perf_counter() - t0


def sgemm_flops_per_s(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    p.add_argument("--steps", type=int, default=None, help="defense steps T (default: the demo configs' 10)")
    p.add_argument("--mm-size", type=int, default=1024, help="side of the sgemm matrices")
    p.add_argument("--mm-repeats", type=int, default=10, help="torch.mm calls per sgemm sample")
    p.add_argument("--json", dest="json_out", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    if args.rounds < 1 or (args.steps is not None and args.steps < 1) or args.mm_size < 1 or args.mm_repeats < 1:
        p.error("--rounds, --steps, --mm-size and --mm-repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    cases = {(m, g): Case(m, cfg, g, args.steps) for m, cfg in CASES for g in GRAPHS}
    settings = {k: Setting(k[0], k[1], int(c.x.shape[0])) for k, c in cases.items()}
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    for key, case in cases.items():  # FLOPs of one call per setting; the call doubles as the warm-up
        settings[key].flops, outputs[key] = case.count_flops()
        settings[key].passes_flops = case.count_pass_flops()
    sgemm: list[float] = []
    for _ in range(args.rounds):
        for model, _cfg in CASES:
            sgemm.append(sgemm_flops_per_s(args.mm_size, args.mm_repeats))
            for graph in GRAPHS:
                settings[(model, graph)].seconds.append(cases[(model, graph)].purify()[1])
                settings[(model, graph)].passes_seconds.append(cases[(model, graph)].passes_alone())
    peak = statistics.median(sgemm)
    summary: dict[str, Any] = {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "sgemm_gflops": peak / 1e9,
        "sgemm_samples_gflops": [s / 1e9 for s in sgemm],
        "settings": [],
    }
    for (model, graph), s in settings.items():
        plain = settings[(model, "plain")]
        row = {
            **asdict(s),
            "median_s": s.median_s,
            "gflops": s.gflops,
            "efficiency": s.gflops * 1e9 / peak,
            "speedup_vs_plain": plain.median_s / s.median_s,
            "max_abs_diff_vs_plain": float((outputs[(model, graph)] - outputs[(model, "plain")]).abs().max()),
            "passes_median_s": statistics.median(s.passes_seconds),
            "passes_efficiency": s.passes_flops / statistics.median(s.passes_seconds) / peak,
            "purify_vs_passes": statistics.median(s.passes_seconds) / s.median_s,
            "close_fraction_vs_plain": float(
                ((outputs[(model, graph)] - outputs[(model, "plain")]).abs() <= CLOSE).float().mean()
            ),
        }
        summary["settings"].append(row)
    (head,) = [r for r in summary["settings"] if (r["model"], r["graph"]) == HEADLINE]
    summary["efficiency"] = head["efficiency"]
    print(report(summary))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    print(f"efficiency={summary['efficiency']:.3f}")
    return summary


def report(s: dict[str, Any]) -> str:
    samples = s["sgemm_samples_gflops"]
    lines = [
        f"equivariance purify vs sgemm: {s['machine']}, torch {s['torch']}, {s['threads']} thread, "
        f"{s['rounds']} interleaved rounds (medians)",
        f"sgemm 1 thread: {s['sgemm_gflops']:.1f} GFLOP/s (samples {', '.join(f'{g:.1f}' for g in samples)})",
        f"{'model':<14}{'graph':<11}{'batch':>6}{'GFLOP/call':>12}{'s/call':>9}{'GFLOP/s':>9}{'efficiency':>12}"
        f"{'speed-up':>10}{'max|diff|':>11}{'agree':>9}",
    ]
    for r in s["settings"]:
        lines.append(
            f"{r['model']:<14}{r['graph']:<11}{r['batch']:>6}{r['flops'] / 1e9:>12.2f}{r['median_s']:>9.2f}"
            f"{r['gflops']:>9.2f}{r['efficiency']:>12.3f}{r['speedup_vs_plain']:>9.2f}x{r['max_abs_diff_vs_plain']:>11.3g}"
            f"{100 * r['close_fraction_vs_plain']:>8.2f}%"
        )
    lines.append(
        f"(speed-up: plain s / this setting's s; max|diff| and agree: the purified images against the plain graph's, "
        f"largest pixel difference and pixels within {CLOSE:g})"
    )
    lines.append("the model passes of one purify alone (same input shapes, forward + backward, nothing else):")
    lines.append(f"{'model':<14}{'graph':<11}{'s/call':>9}{'efficiency':>12}{'purify reaches':>16}")
    for r in s["settings"]:
        lines.append(
            f"{r['model']:<14}{r['graph']:<11}{r['passes_median_s']:>9.2f}{r['passes_efficiency']:>12.3f}"
            f"{100 * r['purify_vs_passes']:>15.1f}%"
        )
    lines.append("(purify reaches: passes-alone seconds / purify seconds; the rest is the views, objective and update)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
