"""Paper-style tables from the results table alone: one row per attack, one column per defense."""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from storage import results as R

MAIN_METRICS = ("accuracy", "miou", "mask_ap", "miou_to_target")
TEST_TIME_DEFENSES = ("equivariance", "invariance", "random_noise", "rotation", "contrastive")
ADAPTIVE_ATTACKS = ("bpda", "adaptive", "aa")


@dataclass
class Table:
    title: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], str]
    notes: list[str]


def _ordered(values: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def _label(name: str, params_json: str | None, duplicates: bool) -> str:
    params = json.loads(params_json) if isinstance(params_json, str) and params_json else params_json
    if isinstance(params, dict) and "lambda_e_sweep" in params:  # the worst case of an AA sweep
        sweep = ", ".join(f"{v:g}" for v in params["lambda_e_sweep"])
        return f"{name} (lambda_e in {{{sweep}}}; worst {params['worst_lambda_e']:g})"
    if not duplicates or not params_json:
        return name
    if isinstance(params, dict) and "lambda_e" in params:
        return f"{name} (lambda_e={params['lambda_e']:g})"
    eps = params.get("eps") if isinstance(params, dict) else None
    return f"{name} (eps={eps:g})" if isinstance(eps, (int, float)) else f"{name} {params_json}"


def _fmt(value: float, metric: str, partial: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    shown = f"{100 * value:.2f}" if metric in MAIN_METRICS else f"{value:.3f}"
    return shown + ("*" if partial else "")


def build_tables(rows: list[dict[str, Any]]) -> list[Table]:
    if not rows:
        return []
    run_rows = [r for r in rows if r["metric"] in MAIN_METRICS or r["metric"].startswith("equivariance_")]
    attacks_by_name: dict[str, set] = {}
    for r in run_rows:
        attacks_by_name.setdefault(r["attack"], set()).add(r["attack_params"])
    defenses_by_name: dict[str, set] = {}
    for r in run_rows:
        defenses_by_name.setdefault(r["defense"], set()).add(r["defense_params"])

    def a_label(r):
        return _label(r["attack"], r["attack_params"], len(attacks_by_name[r["attack"]]) > 1)

    def d_label(r):
        return (
            _label(r["defense"], None, False)
            if len(defenses_by_name[r["defense"]]) == 1
            else (f"{r['defense']} #{sorted(defenses_by_name[r['defense']]).index(r['defense_params']) + 1}")
        )

    tables = []
    for metric in [m for m in MAIN_METRICS if any(r["metric"] == m for r in run_rows)] + [
        "equivariance_before",
        "equivariance_after",
    ]:
        sel = [r for r in run_rows if r["metric"] == metric]
        if not sel:
            continue
        cells, partial_any = {}, False
        for r in sel:
            partial = int(r.get("shards_done") or 0) < int(r.get("shards_total") or 0)
            partial_any |= partial
            cells[(a_label(r), d_label(r))] = _fmt(r["value"], metric, partial)
        notes = ["* partial: some shards are missing or failed (see `equi status`)"] if partial_any else []
        title = {
            "accuracy": "Top-1 accuracy (%)",
            "miou": "mIoU (%)",
            "mask_ap": "Mask AP (COCO, %)",
            "miou_to_target": "mIoU to the attack target (%) (lower is better)",
            "equivariance_before": "Equivariance score of the defense's input (mean cosine over views)",
            "equivariance_after": "Equivariance score after the defense (mean cosine over views)",
        }[metric]
        tables.append(
            Table(title, _ordered([a_label(r) for r in sel]), _ordered([d_label(r) for r in sel]), cells, notes)
        )
    return tables


def gradient_masking_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """AutoAttack-style sanity check: a test-time (optimising or randomised) defense is only as strong as its
    evaluation under BPDA and defense-aware adaptive attacks. Uses the results table's ``masking_warning`` column
    (set at reduce time from the defenses' declared properties and the attacks run); tables written before that
    column existed fall back to defense and attack names."""
    if rows and "masking_warning" in rows[0]:
        flagged = sorted({r["masking_warning"] for r in rows if r.get("masking_warning")})
        return [f"WARNING (gradient masking): {w}." for w in flagged]
    attacks = {r["attack"] for r in rows}
    adaptive = any(a.startswith(ADAPTIVE_ATTACKS) for a in attacks)
    defenses = sorted({r["defense"] for r in rows if r["defense"] in TEST_TIME_DEFENSES})
    if defenses and not adaptive:
        return [
            f"WARNING (gradient masking): {', '.join(defenses)} {'is a' if len(defenses) == 1 else 'are'} test-time "
            "defense(s) evaluated without BPDA or a defense-aware adaptive attack; their robust numbers here may "
            "overstate robustness."
        ]
    return []


def render_markdown(tables: list[Table], header: str = "") -> str:
    out = [header] if header else []
    for t in tables:
        out.append(f"### {t.title}\n")
        out.append("| attack | " + " | ".join(t.columns) + " |")
        out.append("|---|" + "---|" * len(t.columns))
        for row in t.rows:
            out.append(f"| {row} | " + " | ".join(t.cells.get((row, c), "-") for c in t.columns) + " |")
        out.extend(["", *t.notes, ""] if t.notes else [""])
    return "\n".join(out).rstrip() + "\n"


def render_csv(tables: list[Table]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "attack", "defense", "value"])
    for t in tables:
        for row in t.rows:
            for c in t.columns:
                w.writerow([t.title, row, c, t.cells.get((row, c), "")])
    return buf.getvalue()


def render_html(tables: list[Table], header: str = "") -> str:
    parts = ["<html><body>", f"<p>{html.escape(header)}</p>" if header else ""]
    for t in tables:
        parts.append(f"<h3>{html.escape(t.title)}</h3><table border='1'><tr><th>attack</th>")
        parts += [f"<th>{html.escape(c)}</th>" for c in t.columns]
        parts.append("</tr>")
        for row in t.rows:
            parts.append(f"<tr><td>{html.escape(row)}</td>")
            parts += [f"<td>{html.escape(t.cells.get((row, c), '-'))}</td>" for c in t.columns]
            parts.append("</tr>")
        parts.append("</table>")
        parts += [f"<p>{html.escape(n)}</p>" for n in t.notes]
    parts.append("</body></html>")
    return "\n".join(parts)


def report(results_dir: str, run_id: str, fmt: str = "markdown") -> str:
    table = R.read_results_table(results_dir, run_id)
    rows = table.to_pylist()
    manifest = R.read_run_manifest(results_dir, run_id)
    cfg = manifest.get("config", {})
    header = (
        f"## {run_id}: {cfg.get('dataset', {}).get('name')} / {cfg.get('model', {}).get('name')} "
        f"({manifest.get('n_samples')} samples, {manifest.get('n_shards')} shards, status {manifest.get('status')})\n"
    )
    tables = build_tables(rows)
    warnings = gradient_masking_warnings(rows)
    if fmt == "csv":
        return render_csv(tables)
    if fmt == "html":
        return render_html(tables, header + " ".join(warnings))
    if fmt != "markdown":
        raise ValueError(f"format: expected markdown, csv or html, got {fmt!r}")
    body = render_markdown(tables, header)
    return body + ("\n" + "\n".join(warnings) + "\n" if warnings else "")
