"""The self-contained HTML report (``equi report RUN -f html -o report.html``): what it holds (metadata, every table
with its intervals, sweep and attack-eps plots, example grids for every defense, failed shards), that it is one file
that loads nothing, renders the same bytes for the same results, escapes every string from the results, and that a
real headless Chromium (Debian's chromium + chromium-driver, installed by scripts/install_browser.sh) loads every
image with no console error and a sane layout.

Without the browser the browser test skips outside CI; under ``CI=true`` it fails instead (CI must have it).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import run
from reports import figures
from reports.html_report import attack_eps_sweep, legend_html, render_html_report
from reports.tables import RunIndex, label_rows, run_index
from storage import results as R
from storage.run_store import RunStore
from tasks.config import parse_config
from tasks.png import encode_png
from tests.pipeline_helpers import tiny_config

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Flags for a closed network: no background fetches, no QUIC probes, no component or sync traffic.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
ATTACK_EPS = (16, 48)
EPS_V = (16, 32)
DEFENSES = 1 + len(EPS_V)  # vanilla and the equivariance defense at each eps_v
GRIDS = DEFENSES * len(ATTACK_EPS)  # every defense, its non-clean attacks
IMAGES = 1 + 1 + GRIDS  # the eps_v sweep plot, the attack-eps curve, the grids
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>&amp;\"'"


def html_config(tmp: Path, **over) -> dict:
    """clean + PGD at two eps, vanilla + equivariance at two eps_v, 2 examples: every part of the report."""
    cfg = tiny_config(
        tmp,
        name="htmlrep",
        attacks=[{"name": "clean"}] + [{"name": "pgd", "eps": e, "step_size": e // 3, "steps": 2} for e in ATTACK_EPS],
        defenses=[{"name": "vanilla"}]
        + [{"name": "equivariance", "steps": 2, "views": ["hflip"], "eps_v": e} for e in EPS_V],
        report={"title": "HTML report test", "layout": "eps_v_sweep", "examples": 2},
        cluster={"in_process": True, "torch_threads": 1},
        shard_size=10,
        batch_size=5,
    )
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def html_run(tmp_path_factory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("html")
    cfg = parse_config(html_config(tmp))
    summary = run(cfg)
    assert summary.ok
    return cfg.results_dir, summary.run_id


@pytest.fixture(scope="module")
def report_file(html_run, tmp_path_factory) -> Path:
    """The report as the CLI writes it."""
    results_dir, run_id = html_run
    out = tmp_path_factory.mktemp("out") / "report.html"
    res = CliRunner().invoke(app, ["report", run_id, "-r", results_dir, "-f", "html", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text of each heading."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data) -> None:
        self.text.append(data)


def parse(text: str) -> Tags:
    p = Tags()
    p.feed(text)
    return p


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


# ------------------------------------------------------------------------------------------------ content
def test_report_holds_metadata_tables_plots_and_grids_and_loads_nothing(html_run, report_file) -> None:
    results_dir, run_id = html_run
    text = report_file.read_text()
    tags = parse(text)
    names = [t for t, _ in tags.tags]
    assert "script" not in names and "link" not in names and "iframe" not in names
    # Nothing that could reach the network: every src is a data: URI, every href an in-page anchor.
    for tag, attrs in tags.tags:
        assert not attrs.get("src") or attrs["src"].startswith("data:image/png;base64,"), tag
        assert not attrs.get("href") or attrs["href"].startswith("#"), tag
    assert not re.search(r"url\(|@import", text)
    imgs = [a for t, a in tags.tags if t == "img"]
    assert len(imgs) == IMAGES
    for a in imgs:  # each a valid PNG whose declared box is its real size
        png = base64.b64decode(a["src"].removeprefix("data:image/png;base64,"), validate=True)
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size == (int(a["width"]), int(a["height"]))
        assert a["alt"]
    # Metadata from the manifest.
    manifest = R.read_run_manifest(results_dir, run_id)
    for value in (run_id, manifest["config_hash"], manifest["code_version"], manifest["git_sha"], "lenet5_mnist_clean"):
        assert value in text
    assert "18/18 done" in text and "complete" in text  # 9 units x 2 shards
    # Every defense has a column; a cell carries the value and interval straight from the Parquet results.
    rows = pq.read_table(R.results_table_path(results_dir, run_id)).to_pylist()
    pgd48 = next(
        r
        for r in rows
        if r["metric"] == "accuracy" and r["defense"] == "vanilla" and json.loads(r["attack_params"]).get("eps") == 48
    )
    cell = f'{_pct(pgd48["value"])} <span class="ci">[{100 * pgd48["ci_low"]:.1f}, {100 * pgd48["ci_high"]:.1f}]'
    assert cell in text
    for label in ("vanilla", "equivariance (eps_v=16)", "equivariance (eps_v=32)", "pgd (eps=48, step_size=16)"):
        assert f">{label}</th>" in text
    heads = re.findall(r"<h2>(.*?)</h2>", text)
    assert heads == [
        "Run",
        "Sweep over eps_v",
        "Robustness vs attack eps",
        "All tables (attack x defense)",
        "Examples",
        "Failed shards",
    ]
    assert "No shard failed." in text
    assert text.count("<figcaption>pgd (eps=") == GRIDS  # a grid per (non-clean attack, defense)


def test_attack_eps_curve_starts_at_clean_and_needs_a_sweep(html_run) -> None:
    results_dir, run_id = html_run
    index = run_index(R.read_run_manifest(results_dir, run_id))
    rows = label_rows(R.read_results_table(results_dir, run_id).to_pylist(), index)
    table, series = attack_eps_sweep(rows, index, "accuracy")
    assert table.columns == ["eps=0", "eps=16", "eps=48"]
    assert table.rows == ["vanilla", "equivariance (eps_v=16)", "equivariance (eps_v=32)"]
    by = {(r["attack_label"], r["defense_label"]): r for r in rows if r["metric"] == "accuracy"}
    vanilla = next(s for s in series if s.label == "vanilla")
    assert vanilla.x == [0.0, 16.0, 48.0]
    expected = [
        by[(a, "vanilla")]["value"] * 100 for a in ("clean", "pgd (eps=16, step_size=5)", "pgd (eps=48, step_size=16)")
    ]
    assert vanilla.y == pytest.approx(expected)
    # One PGD eps only: nothing swept, no curve.
    one = RunIndex(index.attacks[:2], index.defenses, index.unit_of)
    assert attack_eps_sweep(rows, one, "accuracy") is None


def test_same_results_give_the_same_bytes_wherever_they_live(html_run, tmp_path) -> None:
    results_dir, run_id = html_run
    first = render_html_report(results_dir, run_id)
    moved = tmp_path / "elsewhere"
    shutil.copytree(results_dir, moved)
    assert render_html_report(str(moved), run_id) == first == render_html_report(results_dir, run_id)


def _hostile_copy(results_dir: str, run_id: str, tmp: Path) -> str:
    """The run with a hostile name, title and class names in its manifest (a results directory from elsewhere)."""
    moved = tmp / "hostile"
    shutil.copytree(results_dir, moved)
    store = RunStore(str(moved), run_id)
    manifest = copy.deepcopy(store.read_manifest())
    manifest["name"] = HOSTILE
    manifest["config"]["name"] = HOSTILE
    manifest["config"]["report"]["title"] = HOSTILE
    manifest["class_names"] = [f"{HOSTILE}{i}" for i in range(10)]
    store.write_manifest(manifest)
    return str(moved)


def test_strings_from_the_results_are_escaped(html_run, report_file, tmp_path) -> None:
    results_dir, run_id = html_run
    hostile_dir = _hostile_copy(results_dir, run_id, tmp_path)
    text = render_html_report(hostile_dir, run_id)
    assert HOSTILE not in text and "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;&amp;amp;&quot;&#x27;" in text
    tags = parse(text)
    # The same elements as the plain report: the payload added none (no script, no extra img).
    plain = parse(report_file.read_text())
    assert sorted({t for t, _ in tags.tags}) == sorted({t for t, _ in plain.tags})
    assert sum(t == "img" for t, _ in tags.tags) == IMAGES
    assert not any(k.startswith("on") for _, a in tags.tags for k in a)
    # Class names are shown (legend) and drawn in the grids.
    assert f"{HOSTILE}7" in "".join(tags.text)


def test_grids_name_the_classes() -> None:
    row = {
        "task": "classification",
        "position": 0,
        "label": 1,
        "view_names": ["hflip"],
        **{f"{s}_image": _png_gray() for s in ("clean", "attacked", "restored")},
        **{f"{s}_pred": 1 for s in ("clean", "attacked", "restored")},
        **{f"{s}_view_preds": [0] for s in ("clean", "attacked", "restored")},
    }
    names = ["T-shirt/top with $math$", "Trouser"]
    named = figures.example_grid([row], title="t $x", class_names=names)
    assert named == figures.example_grid([row], title="t $x", class_names=names)
    assert named != figures.example_grid([row], title="t $x")


def test_class_legend_shows_names_and_label_map_colours() -> None:
    assert legend_html([str(i) for i in range(10)], dense=False) == ""  # the names are the indices: nothing to add
    dense = legend_html(["background", "<b>bag</b>"], dense=True)
    colour = figures.palette(2)[1]
    assert f"background:rgb({colour[0]},{colour[1]},{colour[2]})" in dense and "1: &lt;b&gt;bag&lt;/b&gt;" in dense
    assert "swatch" not in legend_html(["cat", "dog"], dense=False)


def test_run_without_results_table_still_has_metadata_and_shards(html_run, tmp_path) -> None:
    results_dir, run_id = html_run
    moved = tmp_path / "partial"
    shutil.copytree(results_dir, moved)
    R.results_table_path(str(moved), run_id).unlink()
    text = render_html_report(str(moved), run_id)
    assert "No results table yet" in text and "<img" not in text
    assert run_id in text and "no results table yet" in text  # the status line says it too
    assert re.findall(r"<h2>(.*?)</h2>", text) == ["Run", "Tables", "Failed shards"]


def _png_gray() -> bytes:
    return encode_png(np.full((8, 8), 128, dtype=np.uint8))


def test_failed_shards_are_listed(tmp_path, monkeypatch) -> None:
    cfg = html_config(
        tmp_path,
        name="failing",
        attacks=[{"name": "clean"}],
        defenses=[{"name": "vanilla"}],
        report={"examples": 0},
    )
    monkeypatch.setenv("EQUI_FAULTS", "defend:1:always")
    monkeypatch.setenv("EQUI_FAULTS_DIR", str(tmp_path))
    parsed = parse_config(cfg)
    summary = run(parsed)
    assert not summary.ok
    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["report", summary.run_id, "-r", parsed.results_dir, "-f", "html", "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    section = text[text.index('<section id="failed">') :]
    assert "1 shard(s) failed" in section and f"equi resume {summary.run_id}" in section
    cells = re.findall(r"<td[^>]*>(.*?)</td>", section)
    assert cells[:3] == ["clean", "vanilla", "1"] and "InjectedFault" in section
    assert "partial: 1/2 shards, 1 failed" in text


def test_bad_output_path_is_one_line_and_writes_nothing(html_run, tmp_path) -> None:
    results_dir, run_id = html_run
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(app, ["report", run_id, "-r", results_dir, "-f", "html", "-o", str(blocker / "r.html")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert blocker.read_text() == "x"


# ------------------------------------------------------------------------------------------------ the browser
def _browser_or_skip():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        from selenium import webdriver  # noqa: F401
    except ImportError:
        missing.append("selenium (pip, the dev extra)")
    if missing:
        reason = f"headless browser test needs {', '.join(missing)} (scripts/install_browser.sh installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="equi-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


PAGE_FACTS = """
const imgs = [...document.images];
const vw = document.documentElement.clientWidth;
const over = [...document.querySelectorAll('body *')].filter(e => {
  if (e.closest('.scroll') && !e.classList.contains('scroll')) return false;  // scrolls inside its own box
  return e.getBoundingClientRect().right > vw + 1;
}).map(e => e.tagName + '.' + e.className);
return {
  images: imgs.length,
  loaded: imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
  pageWidth: document.documentElement.scrollWidth, viewport: vw, overflowing: over,
  headings: [...document.querySelectorAll('h1,h2,h3')].map(h => +h.tagName[1]),
  title: document.title, scripts: document.scripts.length,
  tables: [...document.querySelectorAll('table')].map(t => [
    t.closest('div').previousElementSibling ? t.closest('div').previousElementSibling.textContent : '',
    t.tBodies[0].rows.length, t.tHead.rows[0].cells.length]),
};
"""


def _open(driver, path: Path, width: int) -> dict:
    driver.set_window_size(width, 900)
    driver.get_log("browser")  # drained: what is logged from here on belongs to this page
    driver.get(path.resolve().as_uri())
    return driver.execute_script(PAGE_FACTS)


def test_report_renders_in_headless_chromium(browser, report_file, tmp_path) -> None:
    for width in (1280, 720):  # a desktop window and a narrow one: wide tables scroll in their box, not the page
        facts = _open(browser, report_file, width)
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        assert facts["images"] == IMAGES and facts["loaded"] == IMAGES
        assert facts["pageWidth"] <= facts["viewport"], facts["overflowing"]
        assert not facts["overflowing"]
    assert facts["scripts"] == 0 and facts["title"].startswith("HTML report test (")
    levels = facts["headings"]
    assert levels[0] == 1 and levels.count(1) == 1
    assert all(b <= a + 1 for a, b in zip(levels, levels[1:], strict=False)), levels  # no skipped level
    tables = {title: (n_rows, n_cols) for title, n_rows, n_cols in facts["tables"]}
    assert tables["Top-1 accuracy (%)"] == (1 + len(ATTACK_EPS), 1 + DEFENSES)  # attacks x (corner + defenses)
    assert tables["Top-1 accuracy (%) vs attack eps (/255) (eps 0: the clean images)"] == (DEFENSES, 1 + 3)
    assert tables["Top-1 accuracy (%) vs eps_v (/255)"] == (1 + len(ATTACK_EPS), 1 + len(EPS_V) + 1)
    browser.set_window_size(1280, 900)
    browser.get(report_file.resolve().as_uri())
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height + 140, 12000))
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.size[0] >= 1200 and im.size[1] >= 2000


def test_hostile_report_runs_no_script_in_the_browser(browser, html_run, tmp_path) -> None:
    results_dir, run_id = html_run
    page = tmp_path / "hostile.html"
    page.write_text(render_html_report(_hostile_copy(results_dir, run_id, tmp_path), run_id))
    facts = _open(browser, page, 1280)
    assert facts["scripts"] == 0 and facts["images"] == IMAGES == facts["loaded"]
    assert facts["title"] == f"{HOSTILE} ({run_id})"
    assert not [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert browser.execute_script("return document.querySelector('h1').textContent") == HOSTILE
