"""The self-contained HTML report of one run (``equi report RUN_ID -f html -o report.html``).

One file that opens anywhere, offline: inline CSS, every PNG embedded as a ``data:`` URI, no script, no font, no
link that loads anything (a Content-Security-Policy in the page says so to the browser as well). It holds the run's
metadata (id, config, samples, status, shards, code versions), every attack x defense table with its 95% intervals
when the results table has them, the experiment layout's tables and plots (eps_v / K sweeps), a robust-metric vs
attack-eps curve when the run sweeps an attack's eps, example grids for every defense with class names, and the
failed shards.

Rendered from the results directory alone, deterministically (same results, same bytes). Every string that comes
from results, manifest or config is HTML-escaped where it is written; nothing from them is ever markup.
"""

from __future__ import annotations

import base64
import html
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from reports import experiment_pages as X
from reports import figures
from reports.tables import (
    MAIN_METRICS,
    TITLES,
    RunIndex,
    Table,
    build_tables,
    entry_parts,
    fmt_cell,
    gradient_masking_warnings,
    is_partial,
    join_label,
    label_rows,
    partial_note,
    run_index,
)
from storage.run_store import RunStore

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f2328;
margin:0 auto;padding:1.5rem 2rem 3rem;max-width:1200px;overflow-wrap:anywhere}
h1{font-size:1.7rem;margin:.2rem 0 .8rem}h2{font-size:1.3rem;margin:2rem 0 .6rem;border-bottom:1px solid #d0d7de;
padding-bottom:.2rem}h3{font-size:1.05rem;margin:1.4rem 0 .4rem}
nav ul{margin:.2rem 0;padding-left:1.2rem;columns:2}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;margin:0}
dl.meta dt{font-weight:600;color:#57606a}dl.meta dd{margin:0}
code,pre{font:12.5px/1.4 ui-monospace,"DejaVu Sans Mono",monospace}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:.7rem;overflow-x:auto;white-space:pre}
.scroll{overflow-x:auto;max-width:100%;margin:.3rem 0}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:.3rem .55rem;text-align:left;vertical-align:top}
thead th{background:#f6f8fa}tbody th{font-weight:600;background:#fbfcfd}
td.num{text-align:right;white-space:nowrap}.ci{color:#57606a;font-size:.9em}
p.note{margin:.2rem 0;color:#57606a;font-size:.92em}
.status-complete{color:#1a7f37;font-weight:600}.status-partial{color:#9a6700;font-weight:600}
.warning{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:.5rem .8rem;margin:.6rem 0}
figure{margin:.8rem 0 1.4rem}figure img{max-width:100%;height:auto;border:1px solid #d0d7de}
.grids{display:flex;flex-wrap:wrap;gap:0 1.5rem;align-items:flex-start}.grids figure{max-width:100%}
figcaption{color:#57606a;font-size:.92em;margin-top:.2rem}
ul.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:.3rem 1rem}
.swatch{display:inline-block;width:.9em;height:.9em;border:1px solid #8c959f;vertical-align:-.1em;margin-right:.3em}
"""
EPS_AXIS = "attack eps (/255)"
SWEPT = ("eps", "step_size")  # attack parameters an attack-eps sweep may vary


@dataclass
class Section:
    """One ``<h2>`` section of the page: its anchor id, heading and HTML parts."""

    id: str
    heading: str
    body: list[str]


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ------------------------------------------------------------------------------------------------ building blocks
def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk (so the page reserves the image's box before it decodes)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])


def figure_html(png: bytes, alt: str, caption: str) -> str:
    width, height = png_size(png)
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="{uri}" alt="{esc(alt)}" width="{width}" height="{height}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def cell_html(text: str) -> str:
    """A table cell: the value, then its interval and marks in a quieter style (``12.00 [5.0, 20.0]~``)."""
    if text == "-":
        return '<td class="num">-</td>'
    value, sep, rest = text.partition(" [")
    tail = f' <span class="ci">[{esc(rest)}</span>' if sep else ""
    return f'<td class="num">{esc(value)}{tail}</td>'


def table_html(table: Table) -> str:
    head = f'<th scope="col">{esc(table.corner)}</th>' + "".join(
        f'<th scope="col">{esc(c)}</th>' for c in table.columns
    )
    body = []
    for row in table.rows:
        cells = "".join(cell_html(table.cells.get((row, c), "-")) for c in table.columns)
        body.append(f'<tr><th scope="row">{esc(row)}</th>{cells}</tr>')
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in table.notes)
    return (
        f"<h3>{esc(table.title)}</h3>\n"
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + "\n</tbody></table></div>"
        + notes
    )


def meta_html(items: Sequence[tuple[str, str]]) -> str:
    return '<dl class="meta">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


# ------------------------------------------------------------------------------------------------ attack eps sweep
def _eps_of(params: Mapping[str, Any]) -> float | None:
    eps = params.get("eps")
    return float(eps) if isinstance(eps, int | float) and not isinstance(eps, bool) else None


def attack_eps_sweep(
    rows: Sequence[Mapping[str, Any]], index: RunIndex | None, metric: str
) -> tuple[Table, list[figures.Series]] | None:
    """Robust metric vs the attack's eps, one series per defense, when the run has one attack (same parameters but
    eps and step size) at two or more eps values; the clean attack, when the run has one, is the curve's eps = 0
    point. ``rows`` are labelled results rows (:func:`reports.tables.label_rows`); None when no attack eps is
    swept."""
    if index is None:
        return None
    groups: dict[tuple[str, str], dict[float, int]] = {}  # (attack name, other parameters) -> eps -> entry index
    for ai, (name, params) in enumerate(index.attacks):
        eps = _eps_of(params)
        if eps is not None:
            # The step size usually scales with eps: entries that differ only in these two are one sweep.
            rest = json.dumps({k: v for k, v in params.items() if k not in SWEPT}, sort_keys=True, default=str)
            groups.setdefault((name, rest), {}).setdefault(eps, ai)
    swept = [(key, by_eps) for key, by_eps in groups.items() if len(by_eps) > 1]
    if not swept:
        return None
    sel = [r for r in rows if r["metric"] == metric and int(r.get("attack_index", -1)) >= 0]
    clean = [ai for ai, (name, _) in enumerate(index.attacks) if name == "clean"]
    labels = [join_label(*p) for p in entry_parts([(n, json.loads(rest)) for (n, rest), _ in swept])]
    cells: dict[tuple[str, str], str] = {}
    points: dict[str, dict[float, float]] = {}
    columns: set[float] = set()
    row_labels = []
    for (_, by_eps), attack in zip(swept, labels, strict=True):
        at = {ai: eps for eps, ai in by_eps.items()}
        if clean and 0.0 not in by_eps:
            at[clean[0]] = 0.0
        for r in sel:
            eps = at.get(int(r["attack_index"]))
            if eps is None:
                continue
            label = f"{attack} / {r['defense_label']}" if len(swept) > 1 else r["defense_label"]
            if label not in row_labels:
                row_labels.append(label)
            columns.add(eps)
            cells.setdefault((label, f"eps={eps:g}"), fmt_cell(r))
            points.setdefault(label, {}).setdefault(
                eps, 100 * float(r["value"]) if metric in MAIN_METRICS else r["value"]
            )
    if not points:
        return None
    title = f"{TITLES[metric]} vs attack eps (/255)" + (" (eps 0: the clean images)" if clean else "")
    cols = [f"eps={eps:g}" for eps in sorted(columns)]
    table = Table(title, row_labels, cols, cells, partial_note(any(map(is_partial, sel))), corner="defense")
    series = [figures.Series(k, sorted(v), [v[x] for x in sorted(v)]) for k, v in points.items()]
    return table, series


# ------------------------------------------------------------------------------------------------ sections
def metadata_items(run_id: str, manifest: Mapping[str, Any], state: X.RunState) -> list[tuple[str, str]]:
    """(label, HTML) pairs of the run's identity, status and provenance."""
    cfg = manifest.get("config") or {}
    status_class = "status-complete" if state.status == "complete" else "status-partial"
    shards = f"{state.shards_done}/{state.shards_total} done" + (f", {state.failed} failed" if state.failed else "")
    weights = manifest.get("weights") or {}
    versions = manifest.get("package_versions") or {}
    items = [
        ("run id", f"<code>{esc(run_id)}</code>"),
        ("name", esc(manifest.get("name") or cfg.get("name") or "")),
        ("dataset", esc((cfg.get("dataset") or {}).get("name"))),
        ("model", esc((cfg.get("model") or {}).get("name"))),
        ("samples (n)", esc(manifest.get("n_samples"))),
        (
            "status",
            f'<span class="{status_class}">{esc(state.summary(run_id))}</span> (manifest: '
            f"{esc(manifest.get('status'))})",
        ),
        (
            "shards",
            f"{esc(manifest.get('n_shards'))} per unit; {esc(shards)} over {len(manifest.get('units') or [])} units",
        ),
        ("created / updated", f"{esc(manifest.get('created_at'))} / {esc(manifest.get('updated_at'))}"),
        ("config hash", f"<code>{esc(manifest.get('config_hash'))}</code>"),
        ("code version", f"<code>{esc(manifest.get('code_version'))}</code>"),
        ("git sha", f"<code>{esc(manifest.get('git_sha'))}</code>"),
        ("packages", esc(", ".join(f"{k} {v}" for k, v in sorted(versions.items())))),
    ]
    if weights:
        shipped = " (shipped)" if weights.get("shipped") else ""
        items.append(
            (
                "weights",
                f"{esc(weights.get('checkpoint'))}{shipped}, sha256 <code>{esc(weights.get('weights_digest'))}</code>",
            )
        )
    return items


def failed_shards(store: RunStore) -> list[dict[str, Any]]:
    """Every failed shard (unit, shard, attempts, last error), as ``equi status`` counts them."""
    out = []
    for u in store.status()["units"]:
        for f in u["failed"]:
            out.append({"attack": u["attack"], "defense": u["defense"], **f})
    return out


def failed_html(failed: Sequence[Mapping[str, Any]], run_id: str) -> str:
    if not failed:
        return "<p>No shard failed.</p>"
    rows = "".join(
        f'<tr><td>{esc(f["attack"])}</td><td>{esc(f["defense"])}</td><td class="num">{esc(f["shard"])}</td>'
        f'<td class="num">{esc(f.get("attempts") if f.get("attempts") is not None else "-")}</td>'
        f"<td><code>{esc(f.get('error') or '')}</code></td></tr>"
        for f in failed
    )
    return (
        f"<p>{len(failed)} shard(s) failed; <code>equi resume {esc(run_id)}</code> retries them.</p>"
        '<div class="scroll"><table><thead><tr><th scope="col">attack</th><th scope="col">defense</th>'
        '<th scope="col">shard</th><th scope="col">attempts</th><th scope="col">last error</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></div>"
    )


def legend_html(class_names: Sequence[str], dense: bool) -> str:
    """The class names (with their label-map colours for dense tasks); nothing when they are just the indices."""
    if not class_names or [str(c) for c in class_names] == [str(i) for i in range(len(class_names))]:
        return ""
    colours = figures.palette(len(class_names)) if dense else None
    items = []
    for i, name in enumerate(class_names):
        swatch = ""
        if colours is not None:
            r, g, b = (int(v) for v in colours[i])
            swatch = f'<span class="swatch" style="background:rgb({r},{g},{b})"></span>'
        items.append(f"<li>{swatch}{i}: {esc(name)}</li>")
    return '<p>Classes:</p><ul class="legend">' + "".join(items) + "</ul>"


def _layout_sections(exp: X.Experiment, rows: list[dict[str, Any]], metrics: list[str]) -> list[Section]:
    """The experiment layout's own tables and plots (:mod:`reports.experiment_pages`' layouts)."""
    if exp.layout in X.SWEEPS:
        param, _, axis, _ = X.SWEEPS[exp.layout]
        body = []
        for metric in metrics:
            table, series = X.sweep_table(rows, exp.layout, metric)
            body.append(table_html(table))
            if any(not s.reference for s in series):
                png = figures.line_plot(
                    series,
                    title=f"{exp.title}: {TITLES[metric]}",
                    xlabel=axis,
                    ylabel=TITLES[metric],
                    integer_x=param == "K",
                )
                body.append(figure_html(png, f"{TITLES[metric]} vs {param}", f"{TITLES[metric]} vs {axis}"))
            else:
                body.append(f'<p class="note">No defense of this run varies {esc(param)}: nothing to plot.</p>')
        return [Section("sweep", f"Sweep over {param}", body)]
    if exp.layout == "ablation":
        return [Section("ablation", "Ablation", [table_html(t) for t in X.ablation_tables(rows)])]
    if exp.layout == "equivariance" and (t := X.equivariance_table(rows)) is not None:
        return [Section("equivariance", "Equivariance of clean, attacked and restored images", [table_html(t)])]
    return []


def _eps_section(exp: X.Experiment, rows: list[dict[str, Any]], index: RunIndex | None, metrics: list[str]):
    body = []
    for metric in metrics:
        sweep = attack_eps_sweep(rows, index, metric)
        if sweep is None:
            continue
        table, series = sweep
        body.append(table_html(table))
        png = figures.line_plot(
            series, title=f"{exp.title}: {TITLES[metric]} vs attack eps", xlabel=EPS_AXIS, ylabel=TITLES[metric]
        )
        body.append(figure_html(png, f"{TITLES[metric]} vs attack eps", f"{TITLES[metric]} vs {EPS_AXIS}"))
    return [Section("attack-eps", "Robustness vs attack eps", body)] if body else []


def _examples_section(
    results_dir: str,
    run_id: str,
    exp: X.Experiment,
    index: RunIndex | None,
    class_names: list[str],
    dense: bool,
    per_defense: int,
) -> list[Section]:
    grids = X.example_grids(
        results_dir, run_id, index, exp.title, per_defense, class_names=class_names, every_defense=True
    )
    if grids:
        body = [
            "<p>Per sample: the clean, attacked and restored image, the ground truth (dense tasks), the prediction "
            "F(x) and each view's prediction g⁻¹F(gx) (the run's <code>measure.views</code>); for every defense, its "
            f"attacks (other than clean when it has any; up to {per_defense}). "
            + ("Label maps in the colours of the classes below.</p>" if dense else "Green: correct, red: wrong.</p>"),
            legend_html(class_names, dense),
        ]
        body.append('<div class="grids">' + "".join(figure_html(png, caption, caption) for caption, _, png in grids))
        body.append("</div>")
        return [Section("examples", "Examples", body)]
    if exp.examples:
        note = (
            "<p>No examples recorded although <code>report.examples</code> is set: examples are written when a shard "
            "is computed, so shards computed without it have none.</p>"
        )
        return [Section("examples", "Examples", [note])]
    return []


# ------------------------------------------------------------------------------------------------ the page
def render_html_report(results_dir: str, run_id: str, *, examples_per_defense: int = 4) -> str:
    """The whole report of one run as one HTML document."""
    results_dir = str(results_dir)
    store = RunStore(results_dir, run_id)
    manifest = store.read_manifest()
    cfg = manifest.get("config") or {}
    exp = X.experiment_of(cfg.get("name") or run_id, cfg.get("report") or {}, run_id)
    state = X.run_state(results_dir, run_id)
    config_text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=100)
    sections = [
        Section(
            "run",
            "Run",
            [
                meta_html(metadata_items(run_id, manifest, state)),
                f"<details><summary>Config</summary><pre>{esc(config_text)}</pre></details>",
            ],
        )
    ]
    index = run_index(manifest)
    rows = label_rows(store.read_results_table().to_pylist(), index) if state.has_results else []
    if not rows:
        note = f"<p>No results table yet: resume the run (<code>equi resume {esc(run_id)}</code>).</p>"
        sections.append(Section("tables", "Tables", [note]))
    else:
        metrics = [m for m in MAIN_METRICS if any(r["metric"] == m for r in rows)]
        warnings = [f'<p class="warning">{esc(w)}</p>' for w in gradient_masking_warnings(rows)]
        sections += _layout_sections(exp, rows, metrics)
        sections += _eps_section(exp, rows, index, metrics)
        sections.append(
            Section("tables", "All tables (attack x defense)", warnings + [table_html(t) for t in build_tables(rows)])
        )
        class_names = [str(c) for c in manifest.get("class_names") or []]
        dense = "accuracy" not in metrics
        sections += _examples_section(results_dir, run_id, exp, index, class_names, dense, examples_per_defense)
    sections.append(Section("failed", "Failed shards", [failed_html(failed_shards(store), run_id)]))
    return document(exp.title, run_id, sections)


def document(title: str, run_id: str, sections: Sequence[Section]) -> str:
    toc = "".join(f'<li><a href="#{s.id}">{esc(s.heading)}</a></li>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)} ({esc(run_id)})</title>",
        f"<style>{CSS}</style></head><body>",
        f"<header><h1>{esc(title)}</h1><p>Robustness report of run <code>{esc(run_id)}</code>, rendered from its "
        "results directory by <code>equi report -f html</code>.</p>",
        f"<nav><ul>{toc}</ul></nav></header><main>",
    ]
    parts += [f'<section id="{s.id}"><h2>{esc(s.heading)}</h2>\n' + "\n".join(s.body) + "</section>" for s in sections]
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"
