"""Paper-style tables from the results table alone: one row per attack, one column per defense.

Columns (and rows) of entries that share a name get the parameters that tell them apart, taken from the run's
config in its manifest: ``equivariance (views=rotate15)``, ``pgd (eps=4)``. Without a manifest the recorded
(resolved) parameters are used. Layout-specific tables (Table 4-6, Figure 3) and the experiment pages written by
``equi report --all`` are in :mod:`reports.experiment_pages`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from storage.run_store import RunStore

MAIN_METRICS = ("accuracy", "miou", "mask_ap", "miou_to_target")
TEST_TIME_DEFENSES = ("equivariance", "invariance", "random_noise", "rotation", "contrastive")
ADAPTIVE_ATTACKS = ("bpda", "adaptive", "aa")
WORST = ":worst"  # suffix of the worst-case rows of an AA lambda_e sweep (tasks.reduce.WORST_SUFFIX)
TITLES = {
    "accuracy": "Top-1 accuracy (%)",
    "miou": "mIoU (%)",
    "mask_ap": "Mask AP (COCO, %)",
    "miou_to_target": "mIoU to the attack target (%) (lower is better)",
    "equivariance_before": "Equivariance score of the defense's input (mean cosine over views)",
    "equivariance_after": "Equivariance score after the defense (mean cosine over views)",
}


@dataclass
class Table:
    title: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], str]
    notes: list[str]
    corner: str = "attack"  # header of the row-label column


def model_label(manifest: Mapping[str, Any]) -> str:
    """The run's model as its manifest names it: a built-in name, a factory ``module:function`` or a file name."""
    cfg = manifest.get("config") or {}
    model = cfg.get("model") or {}
    weights = manifest.get("weights") or {}
    return str(weights.get("model") or model.get("name") or model.get("factory") or model.get("file"))


def ordered(values: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


_MISSING = object()


def _show(value: Any) -> str:
    if value is _MISSING or value is None:
        return "default"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def entry_parts(entries: Sequence[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, str]]:
    """(name, qualifier) per config entry: the qualifier lists the parameters that differ among the entries of the
    same name ("" when the name is unique), e.g. ("equivariance", "views=rotate15")."""
    groups: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(entries):
        groups.setdefault(name, []).append(i)
    out = [(name, "") for name, _ in entries]
    for name, idx in groups.items():
        if len(idx) < 2:
            continue
        params = [dict(entries[i][1]) for i in idx]
        keys = sorted({k for p in params for k in p if k != "name"})
        differ = [k for k in keys if len({_show(p.get(k, _MISSING)) for p in params}) > 1]
        for i, p in zip(idx, params, strict=True):
            out[i] = (name, ", ".join(f"{k}={_show(p.get(k, _MISSING))}" for k in differ))
    seen: dict[tuple[str, str], int] = {}
    for i, part in enumerate(out):  # identical entries cannot be told apart by parameters: number them
        seen[part] = seen.get(part, 0) + 1
        if seen[part] > 1:
            out[i] = (part[0], f"{part[1]} #{seen[part]}".strip())
    return out


def join_label(name: str, qualifier: str) -> str:
    return f"{name} ({qualifier})" if qualifier else name


def _params(value: Any) -> dict[str, Any]:
    if isinstance(value, str) and value:
        value = json.loads(value)
    return dict(value) if isinstance(value, Mapping) else {}


def _worst_label(name: str, params: Mapping[str, Any]) -> str:
    """The worst case of an AA lambda_e sweep: one row for every defense (each defense's worst lambda_e is named in
    the table's notes)."""
    sweep = ", ".join(f"{v:g}" for v in params["lambda_e_sweep"])
    return f"{name} (lambda_e in {{{sweep}}})"


def worst_notes(sel: Sequence[Mapping[str, Any]]) -> list[str]:
    """Which lambda_e gave each defense its worst case."""
    worst = [r for r in sel if str(r.get("attack", "")).endswith(WORST)]
    if not worst:
        return []
    parts = [f"{r['defense_label']}: {_params(r['attack_params'])['worst_lambda_e']:g}" for r in worst]
    return ["worst-case lambda_e per defense: " + ", ".join(parts)]


@dataclass
class RunIndex:
    """A run's config entries and which (attack, defense) entry each (attack_key, defense_key) unit belongs to."""

    attacks: list[tuple[str, dict[str, Any]]]
    defenses: list[tuple[str, dict[str, Any]]]
    unit_of: dict[tuple[str, str], tuple[int, int]]


def run_index(manifest: Mapping[str, Any]) -> RunIndex | None:
    """From a run manifest (its config and its units, listed attack-major as the pipeline plans them)."""
    cfg = manifest.get("config") or {}
    attacks = [(a["name"], {k: v for k, v in a.items() if k != "name"}) for a in cfg.get("attacks", [])]
    defenses = [(d["name"], {k: v for k, v in d.items() if k != "name"}) for d in cfg.get("defenses", [])]
    units = manifest.get("units") or []
    if not attacks or not defenses or len(units) != len(attacks) * len(defenses):
        return None
    unit_of = {}
    for i, u in enumerate(units):
        unit_of.setdefault((u["attack_key"], u["defense_key"]), (i // len(defenses), i % len(defenses)))
    return RunIndex(attacks, defenses, unit_of)


def label_rows(rows: Sequence[Mapping[str, Any]], index: RunIndex | None = None) -> list[dict[str, Any]]:
    """Copies of the results rows with ``attack_label``, ``defense_label``, ``defense_name`` / ``defense_qualifier``
    and the config entry indices (``attack_index``, ``defense_index``; -1 when unknown)."""
    a_parts = entry_parts(index.attacks) if index else []
    d_parts = entry_parts(index.defenses) if index else []
    # Fallback: entries as recorded in the rows (attack params as configured, defense params as resolved).
    rec_a = list(dict.fromkeys((r["attack"], r["attack_params"] or "") for r in rows if WORST not in r["attack"]))
    rec_d = list(dict.fromkeys((r["defense"], r["defense_params"] or "") for r in rows))
    rec_a_parts = dict(zip(rec_a, entry_parts([(n, _params(p)) for n, p in rec_a]), strict=True))
    rec_d_parts = dict(zip(rec_d, entry_parts([(n, _params(p)) for n, p in rec_d]), strict=True))
    # A defense's entry by its key alone: rows with no config attack (the per-image worst case) still belong to it.
    defense_of = {dk: di for (_, dk), (_, di) in index.unit_of.items()} if index else {}
    out = []
    for r in rows:
        a_key = str(r.get("attack_key") or "").split("+")[0]
        ai, di = index.unit_of.get((a_key, str(r.get("defense_key") or "")), (-1, -1)) if index else (-1, -1)
        if di < 0:
            di = defense_of.get(str(r.get("defense_key") or ""), -1)
        if WORST in r["attack"]:
            a_label = _worst_label(r["attack"], _params(r["attack_params"]))
            ai = -1
        elif ai >= 0:
            a_label = join_label(*a_parts[ai])
        else:
            a_label = join_label(*rec_a_parts[(r["attack"], r["attack_params"] or "")])
        d_name, d_qual = d_parts[di] if di >= 0 else rec_d_parts[(r["defense"], r["defense_params"] or "")]
        out.append(
            {
                **r,
                "attack_label": a_label,
                "defense_label": join_label(d_name, d_qual),
                "defense_name": d_name,
                "defense_qualifier": d_qual,
                "attack_index": ai,
                "defense_index": di,
            }
        )
    return out


WIDE_HALF_WIDTH = 0.05  # a 95% interval wider than +-5 points is marked: differences that small are not resolved


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value: float, metric: str, partial: bool) -> str:
    if _missing(value):
        return "-"
    shown = f"{100 * value:.2f}" if is_percent(metric) else f"{value:.3f}"
    return shown + ("*" if partial else "")


def is_percent(metric: str) -> bool:
    return metric in MAIN_METRICS or metric.removesuffix("_all_draws") in MAIN_METRICS


def is_partial(row: Mapping[str, Any]) -> bool:
    return int(row.get("shards_done") or 0) < int(row.get("shards_total") or 0)


def is_wide(row: Mapping[str, Any]) -> bool:
    low, high = row.get("ci_low"), row.get("ci_high")
    return not _missing(low) and not _missing(high) and (high - low) / 2 > WIDE_HALF_WIDTH


def fmt_interval(low: Any, high: Any, metric: str) -> str:
    if _missing(low) or _missing(high):
        return ""
    return f" [{100 * low:.1f}, {100 * high:.1f}]" if is_percent(metric) else f" [{low:.3f}, {high:.3f}]"


def fmt_cell(row: Mapping[str, Any]) -> str:
    """A table cell: the value (in % for the task metrics) and its 95% interval when the results table has one,
    ``*`` when some of its shards are missing, ``~`` when the interval is wider than +-5 points."""
    cell = _fmt(row["value"], row["metric"], is_partial(row))
    if cell == "-":
        return cell
    return cell + fmt_interval(row.get("ci_low"), row.get("ci_high"), row["metric"]) + ("~" if is_wide(row) else "")


def fmt_delta(row: Mapping[str, Any]) -> str:
    """Defense minus vanilla on the same images, with its paired 95% interval; ``+`` marks an interval above 0 and
    ``-`` one below 0 (only then does the table say the defense changed the metric)."""
    delta, low, high = row.get("delta"), row.get("delta_ci_low"), row.get("delta_ci_high")
    if _missing(delta):
        return "-"
    sign = " (+)" if not _missing(low) and low > 0 else " (-)" if not _missing(high) and high < 0 else ""
    shown = f"{100 * delta:+.2f}" if is_percent(row["metric"]) else f"{delta:+.3f}"
    return shown + fmt_interval(low, high, row["metric"]) + sign


def partial_note(partial: bool) -> list[str]:
    return ["* partial: some shards are missing or failed (see `equi status`)"] if partial else []


def interval_notes(sel: Sequence[Mapping[str, Any]]) -> list[str]:
    """How the intervals were made, and what the marks mean."""
    if not any(not _missing(r.get("ci_low")) for r in sel):
        return []
    notes = ["[low, high]: 95% bootstrap interval over images (1000 resamples, seeded)"]
    if any(is_wide(r) for r in sel):
        notes.append("~ interval wider than +-5 points: too few images to resolve differences that small")
    if any(int(r.get("n_draws") or 1) > 1 for r in sel):
        spread = max(float(r.get("draw_std") or 0) for r in sel)
        # Mask AP is not a per-image sum, so instance runs have no all-draws worst table.
        worst_table = (
            "; their all-draws worst is a separate table" if not any(r["metric"] == "mask_ap" for r in sel) else ""
        )
        notes.append(
            "randomised defenses: mean over their evaluation draws (between-draw standard deviation up to "
            f"{100 * spread:.2f} points){worst_table}"
        )
    # Task metrics only: the equivariance measure is taken on the first draw by design.
    single = sorted(
        {
            r["defense_label"]
            for r in sel
            if is_percent(r["metric"]) and r.get("defense_randomized") and int(r.get("n_draws") or 1) == 1
        }
    )
    if single:
        notes.append(
            f"scored on one draw of their randomness: {', '.join(single)} (cells can move between draws; "
            "eval_draws > 1 gives the mean and the all-draws worst)"
        )
    if any(r["attack"] == "worst" for r in sel):
        notes.append(
            "worst: per image over every attack of the run (and every evaluation draw), never a minimum of cells"
        )
    return notes


def sample_note(sel: Sequence[Mapping[str, Any]], metric: str) -> list[str]:
    """How many images a cell rests on, and for accuracy the binomial standard error it implies, so a reader can
    tell a difference from sampling noise."""
    counts = sorted({int(r["n_samples"]) for r in sel if r.get("n_samples")})
    if not counts:
        return []
    text = f"n = {' or '.join(map(str, counts))} images per cell"
    if metric == "accuracy":
        n = counts[0]
        # The standard error sqrt(p(1-p)/n) is largest at p = 0.5.
        text += f": one image = {100 / n:.2f} points, standard error up to {50 / math.sqrt(n):.1f} points"
    return [text]


def table_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    present = {r["metric"] for r in rows}
    return [m for m in (*MAIN_METRICS, "equivariance_before", "equivariance_after") if m in present]


def build_tables(rows: list[dict[str, Any]]) -> list[Table]:
    """One table per metric: rows attacks, columns defenses (labelled as :func:`label_rows` says)."""
    if not rows:
        return []
    if "defense_label" not in rows[0]:
        rows = label_rows(rows)
    run_rows = [r for r in rows if is_percent(r["metric"]) or r["metric"].startswith("equivariance_")]
    tables = []
    for metric in table_metrics(run_rows):
        sel = [r for r in run_rows if r["metric"] == metric]
        cells = {(r["attack_label"], r["defense_label"]): fmt_cell(r) for r in sel}
        notes = (
            partial_note(any(is_partial(r) for r in sel))
            + sample_note(sel, metric)
            + interval_notes(sel)
            + worst_notes(sel)
        )
        rows_, cols = ordered([r["attack_label"] for r in sel]), ordered([r["defense_label"] for r in sel])
        tables.append(Table(TITLES[metric], rows_, cols, cells, notes))
        drawn = [r for r in run_rows if r["metric"] == f"{metric}_all_draws"]
        if drawn:
            cells = {(r["attack_label"], r["defense_label"]): fmt_cell(r) for r in drawn}
            cols = ordered([r["defense_label"] for r in drawn])
            note = ["an image counts only if the defense gets it right under every one of its evaluation draws"]
            tables.append(
                Table(
                    TITLES[metric] + ", all-draws worst", ordered([r["attack_label"] for r in drawn]), cols, cells, note
                )
            )
        # The defense's input is the same for both unless the attack saw the defense: no difference to show there.
        deltas = [r for r in sel if not _missing(r.get("delta")) and metric != "equivariance_before"]
        if deltas:
            cells = {(r["attack_label"], r["defense_label"]): fmt_delta(r) for r in deltas}
            cols = ordered([r["defense_label"] for r in deltas])
            note = [
                "paired on the same images (the same resamples for both); (+) / (-): the 95% interval excludes 0, "
                "so the defense raised / lowered the metric; no mark: not resolved at this n"
            ]
            tables.append(
                Table(
                    TITLES[metric] + ": defense minus vanilla",
                    ordered([r["attack_label"] for r in deltas]),
                    cols,
                    cells,
                    note,
                )
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
        out.append(f"| {t.corner} | " + " | ".join(t.columns) + " |")
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


def report(results_dir: str, run_id: str, fmt: str = "markdown") -> str:
    """The run's tables as Markdown or CSV (the HTML report is :func:`reports.html_report.render_html_report`)."""
    if fmt not in ("markdown", "csv"):
        raise ValueError(f"format: expected markdown or csv, got {fmt!r}")
    store = RunStore(results_dir, run_id)
    table = store.read_results_table()
    rows = table.to_pylist()
    manifest = store.read_manifest()
    cfg = manifest.get("config", {})
    header = (
        f"## {run_id}: {cfg.get('dataset', {}).get('name')} / {model_label(manifest)} "
        f"({manifest.get('n_samples')} samples, {manifest.get('n_shards')} shards, status {manifest.get('status')})\n"
    )
    tables = build_tables(label_rows(rows, run_index(manifest)))
    warnings = gradient_masking_warnings(rows)
    if fmt == "csv":
        return render_csv(tables)
    body = render_markdown(tables, header)
    return body + ("\n" + "\n".join(warnings) + "\n" if warnings else "")
