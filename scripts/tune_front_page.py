"""A Markdown page of an `equi tune` search (its front.parquet and tune.json) for docs/tuning/, so TUNING.md can
quote the search's table like every other table (scripts/render_results.py copies it verbatim).

    python scripts/tune_front_page.py .equi/results/tune/<name> docs/tuning   # writes docs/tuning/<name>-front.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq


def _pct(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f} [{100 * low:.1f}, {100 * high:.1f}]" if low is not None else f"{100 * value:.2f}"


def page(folder: Path) -> str:
    tune = json.loads((folder / "tune.json").read_text())
    rows = pq.read_table(folder / "front.parquet").to_pylist()
    metric = {"accuracy": "Top-1 accuracy", "miou": "mIoU"}.get(tune["metric"], tune["metric"])
    n = rows[0]["n_samples"] if rows else 0
    lines = [
        f"# {tune['name']}: the search",
        "",
        f"### {metric} (%) on the {tune['validation_split']} split: candidates and the front",
        "",
        "| candidate | settings | clean | robust (screen attack) | on front | robust (confirmed, per-image worst) "
        "| chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in json.loads(r["settings"] or "{}").items()) or "as configured"
        lines.append(
            f"| {r['candidate']} | {settings} | {_pct(r['clean'], r['clean_ci_low'], r['clean_ci_high'])} | "
            f"{_pct(r['robust_screen'], r['robust_screen_ci_low'], r['robust_screen_ci_high'])} | "
            f"{'yes' if r['on_front'] else ''} | "
            f"{_pct(r['robust_confirmed'], r['robust_confirmed_ci_low'], r['robust_confirmed_ci_high'])} | "
            f"{'**chosen**' if r['chosen'] else ''} |"
        )
    cost = tune["cost"]
    lines += [
        "",
        f"n = {n} validation images per candidate; [low, high]: 95% bootstrap intervals. Rule: {tune['rule']}. "
        f"Cost: {cost['runs']} runs, {cost['shards_computed']} unit-shards, {cost['image_passes']:,.0f} image "
        f"passes, {cost['seconds']:.0f} s wall.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    folder, out = Path(argv[0]), Path(argv[1])
    name = json.loads((folder / "tune.json").read_text())["name"]
    target = out / f"{name}-front.md"
    target.write_text(page(folder))
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
