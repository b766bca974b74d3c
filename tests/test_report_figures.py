"""The report side of the experiments: Markdown tables re-derived from the Parquet results alone, PNG plots and
example grids (valid, small, byte-identical when re-rendered), the examples Parquet (independent of sharding),
"not run" / partial runs, and the report section staying out of the run id."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import run
from reports import experiment_pages as X
from reports import figures
from reports.tables import build_tables, entry_parts, label_rows, render_markdown, run_index
from storage import results as R
from storage.examples import EXAMPLES_SCHEMA, examples_path, read_examples
from tasks.config import parse_config
from tasks.examples import ExampleMaker, example_slots, merge_instances
from tasks.png import NO_LABEL_8, decode_png
from tests.models_for_tests import NUM_CLASSES, make_task
from tests.pipeline_helpers import mnist_root, tiny_config

EPS_V = (0, 16, 32)
MEASURE_VIEWS = ["hflip", {"name": "rotate", "degrees": [10, 20]}]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep_config(tmp: Path, **over) -> dict:
    """Table 6 in miniature: clean + PGD, vanilla and the equivariance defense at three eps_v, 2 examples."""
    mnist_root(tmp)
    cfg = tiny_config(
        tmp,
        name="sweep",
        defenses=[{"name": "vanilla"}]
        + [{"name": "equivariance", "steps": 2, "views": ["hflip"], "eps_v": e} for e in EPS_V],
        measure={"views": MEASURE_VIEWS},
        report={"experiment": "table6", "title": "Clean vs robust accuracy over eps_v", "layout": "eps_v_sweep"},
        cluster={"in_process": True, "torch_threads": 1},
    )
    cfg["report"]["examples"] = 2
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = parse_config(sweep_config(tmp))
    summary = run(cfg)
    assert summary.ok and summary.n_shards == 4
    return cfg, summary.run_id


# ------------------------------------------------------------------------------------------------ tables
def _expected_sweep_markdown(results_dir: str, run_id: str) -> str:
    """The eps_v sweep table computed straight from the Parquet file (not through the report code)."""
    table = pq.read_table(R.results_table_path(results_dir, run_id)).to_pylist()
    acc = [r for r in table if r["metric"] == "accuracy"]
    cells: dict[tuple[str, str], str] = {}
    for r in acc:
        params = json.loads(r["defense_params"])
        column = f"eps_v={params['eps_v']:g}" if r["defense"] == "equivariance" else r["defense"]
        low, high = r["ci_low"], r["ci_high"]
        wide = "~" if (high - low) / 2 > 0.05 else ""
        cells[(r["attack"], column)] = f"{100 * r['value']:.2f} [{100 * low:.1f}, {100 * high:.1f}]{wide}"
    columns = [f"eps_v={e:g}" for e in sorted(EPS_V)] + ["vanilla"]
    lines = [
        "### Top-1 accuracy (%) vs eps_v (/255)",
        "",
        "| attack | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for attack in ("clean", "pgd"):
        lines.append(f"| {attack} | " + " | ".join(cells[(attack, c)] for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _labelled_rows(results_dir: str, run_id: str) -> list[dict]:
    rows = R.read_results_table(results_dir, run_id).to_pylist()
    return label_rows(rows, run_index(R.read_run_manifest(results_dir, run_id)))


def test_sweep_table_is_rederived_exactly_from_the_parquet_results(sweep_run, tmp_path) -> None:
    cfg, run_id = sweep_run
    expected = _expected_sweep_markdown(cfg.results_dir, run_id)
    table, series = X.sweep_table(_labelled_rows(cfg.results_dir, run_id), "eps_v_sweep", "accuracy")
    rendered = render_markdown([table])
    assert rendered.startswith(expected)
    # then the notes: what a cell rests on, from the Parquet rows too
    (n,) = {r["n_samples"] for r in pq.read_table(R.results_table_path(cfg.results_dir, run_id)).to_pylist()}
    assert rendered[len(expected) :].startswith(f"\nn = {n} images per cell: one image = {100 / n:.2f} points")
    assert [s.label for s in series if not s.reference] == ["clean", "pgd"]
    assert [s.x for s in series if not s.reference] == [[0.0, 16.0, 32.0]] * 2
    # The experiment page carries that table verbatim.
    exp = X.Experiment("table6", "t", "eps_v_sweep", run_id, examples=2)
    X.write_report(cfg.results_dir, tmp_path, [exp])
    assert expected in (tmp_path / "table6.md").read_text()


def test_columns_that_differ_by_a_parameter_get_readable_labels(sweep_run) -> None:
    cfg, run_id = sweep_run
    [accuracy, *_] = build_tables(_labelled_rows(cfg.results_dir, run_id))
    assert accuracy.columns == [
        "vanilla",
        "equivariance (eps_v=0)",
        "equivariance (eps_v=16)",
        "equivariance (eps_v=32)",
    ]
    assert accuracy.rows == ["clean", "pgd"]
    parquet = pq.read_table(R.results_table_path(cfg.results_dir, run_id)).to_pylist()
    value = next(
        r["value"]
        for r in parquet
        if r["metric"] == "accuracy" and r["attack"] == "pgd" and json.loads(r["defense_params"]).get("eps_v") == 16
    )
    assert accuracy.cells[("pgd", "equivariance (eps_v=16)")].split(" [")[0] == f"{100 * value:.2f}"


def test_entry_labels_and_k_of_views() -> None:
    entries = [
        ("vanilla", {}),
        ("equivariance", {"views": "rotate15", "steps": 20}),
        ("equivariance", {"views": "flip", "steps": 20}),
        ("pgd", {"eps": 4}),
    ]
    assert entry_parts(entries) == [
        ("vanilla", ""),
        ("equivariance", "views=rotate15"),
        ("equivariance", "views=flip"),
        ("pgd", ""),
    ]
    assert entry_parts([("e", {"eps_v": 2}), ("e", {})]) == [("e", "eps_v=2"), ("e", "eps_v=default")]
    assert entry_parts([("e", {}), ("e", {})]) == [("e", ""), ("e", "#2")]
    assert [X.k_of_views(v) for v in ("paper_k1", "paper_k12", "paper", "flip", ["hflip", "rotate"], "nope")] == [
        1,
        12,
        8,
        1,
        2,
        None,
    ]


def _row(attack: str, defense: str, views: str, value: float, key: str) -> dict:
    return {
        "attack": attack,
        "attack_params": "{}" if attack == "clean" else '{"eps":4}',
        "defense": defense,
        "defense_params": json.dumps({"name": defense, "views": views}),
        "metric": "miou",
        "value": value,
        "shards_done": 2,
        "shards_total": 2,
        "attack_key": attack,
        "defense_key": key,
        "n_samples": 40,
        "ci_low": value - 0.01,
        "ci_high": value + 0.01,
    }


def test_k_sweep_and_ablation_layouts_from_rows() -> None:
    rows = [
        _row(a, "equivariance", f"paper_k{k}", 0.1 * k + (0.01 if a == "pgd" else 0.5), f"k{k}")
        for a in ("clean", "pgd")
        for k in (1, 2, 4)
    ]
    rows.append({**_row("pgd", "vanilla", "", 0.05, "v"), "defense_params": '{"name":"vanilla"}', "shards_done": 1})
    labelled = label_rows(rows)
    table, series = X.sweep_table(labelled, "k_sweep", "miou")
    assert table.columns == ["K=1", "K=2", "K=4", "vanilla"]
    assert table.cells[("pgd", "K=4")] == "41.00 [40.0, 42.0]" and table.cells[("pgd", "vanilla")] == "5.00* [4.0, 6.0]"
    assert table.notes and "partial" in table.notes[0]
    # The sweep and ablation shapes say what their cells rest on, as the attack x defense tables do.
    assert "n = 40 images per cell" in table.notes and any(n.startswith("[low, high]") for n in table.notes)
    assert [(s.label, s.x) for s in series if not s.reference] == [("clean", [1.0, 2.0, 4.0]), ("pgd", [1.0, 2.0, 4.0])]
    ablation = X.ablation_tables(labelled)
    pgd = next(t for t in ablation if t.title.endswith("attack pgd"))
    assert pgd.rows == ["equivariance", "vanilla"] and pgd.columns == [
        "views=paper_k1",
        "views=paper_k2",
        "views=paper_k4",
        "-",
    ]
    assert "n = 40 images per cell" in pgd.notes and any(n.startswith("[low, high]") for n in pgd.notes)


# ------------------------------------------------------------------------------------------------ figures
def _check_png(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_MAGIC)
    assert 1_000 < len(data) < 200_000, len(data)
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        assert not {k for k in img.info if k.lower() in ("software", "creation time", "date")}
    assert 100 <= w <= 2500 and 100 <= h <= 2500
    return w, h


def test_pages_and_pngs_are_valid_small_and_byte_identical_when_rerendered(sweep_run, tmp_path) -> None:
    cfg, run_id = sweep_run
    exps = X.experiments_from_results(cfg.results_dir)
    assert [(e.name, e.layout, e.examples) for e in exps] == [("table6", "eps_v_sweep", 2)]
    first = X.write_report(cfg.results_dir, tmp_path / "a", exps)
    second = X.write_report(cfg.results_dir, tmp_path / "b", exps)
    names = sorted(p.name for p in first)
    assert names == sorted(p.name for p in second)
    assert names == ["README.md", "table6-eps_v-accuracy.png", "table6-examples-2-pgd.png", "table6.md"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        if name.endswith(".png"):
            _check_png((tmp_path / "a" / name).read_bytes())
    page = (tmp_path / "a" / "table6.md").read_text()
    assert "![Top-1 accuracy (%) vs eps_v](table6-eps_v-accuracy.png)" in page
    assert "(table6-examples-2-pgd.png)" in page and "Status: complete." in page
    assert (
        f"| [Clean vs robust accuracy over eps_v](table6.md) | eps_v_sweep | `{run_id}` | complete |"
        in (tmp_path / "a" / "README.md").read_text()
    )


def test_line_plot_is_deterministic_and_colourise_marks_unseen_pixels() -> None:
    series = [figures.Series("pgd", [1, 2, 4], [10.0, 20.0, 25.0]), figures.Series("ref", [], [5.0], reference=True)]
    a = figures.line_plot(series, title="t", xlabel="K", ylabel="mIoU (%)", integer_x=True)
    assert a == figures.line_plot(series, title="t", xlabel="K", ylabel="mIoU (%)", integer_x=True)
    _check_png(a)
    rgb = figures.colourise(np.array([[0, 1], [2, NO_LABEL_8]], dtype=np.uint8), NO_LABEL_8)
    assert tuple(rgb[1, 1]) == figures.NO_LABEL_COLOUR and tuple(rgb[0, 0]) == (0, 0, 0)
    assert len({tuple(c) for c in figures.palette(21)}) == 21


# ------------------------------------------------------------------------------------------------ examples
CONTENT = [c for c in EXAMPLES_SCHEMA.names if c not in ("attack_key", "defense_key", "shard")]


def _examples_by_unit(results_dir: str, run_id: str) -> dict[tuple[int, int, int], dict]:
    index = run_index(R.read_run_manifest(results_dir, run_id))
    out = {}
    for ex in read_examples(results_dir, run_id).to_pylist():
        ai, di = index.unit_of[(ex["attack_key"], ex["defense_key"])]
        out[(ai, di, ex["position"])] = {c: ex[c] for c in CONTENT}
    return out


def test_examples_parquet_rows_and_columns(sweep_run) -> None:
    cfg, run_id = sweep_run
    table = read_examples(cfg.results_dir, run_id)
    assert table.schema.names == EXAMPLES_SCHEMA.names
    assert table.num_rows == 2 * 2 * 4  # 2 examples x 2 attacks x 4 defenses
    rows = table.to_pylist()
    assert {r["position"] for r in rows} == {0, 1} and {r["shard"] for r in rows} == {0}
    assert {r["sample_id"] for r in rows} == {"test/000000", "test/000001"}
    # Only shard 0 holds examples: no file for the other shards.
    a_key, d_key = rows[0]["attack_key"], rows[0]["defense_key"]
    assert examples_path(cfg.results_dir, run_id, a_key, d_key, 0).is_file()
    assert not examples_path(cfg.results_dir, run_id, a_key, d_key, 1).exists()
    for r in rows:
        assert r["task"] == "classification" and r["label_map"] is None and r["clean_pred_map"] is None
        assert r["view_names"][0] == "hflip" and r["view_names"][1].startswith("rotate +1")
        for state in ("clean", "attacked", "restored"):
            img = decode_png(r[f"{state}_image"])
            assert img.shape == (28, 28) and img.dtype == np.uint8
            assert len(r[f"{state}_view_preds"]) == len(MEASURE_VIEWS) and 0 <= r[f"{state}_pred"] < 10
        if r["attack"] == "clean":
            assert r["attacked_image"] == r["clean_image"]
        else:
            assert r["attacked_image"] != r["clean_image"]
        if r["defense"] == "vanilla":
            assert r["restored_image"] == r["attacked_image"] and r["restored_pred"] == r["attacked_pred"]
    # The clean row's prediction is the model's prediction on the clean image: these digits are classified right.
    assert all(r["clean_pred"] == r["label"] for r in rows)
    # The recorded predictions agree with the per-sample results of the same unit.
    samples = pq.read_table(R.shard_path(cfg.results_dir, run_id, a_key, d_key, 0)).to_pylist()
    by_id = {s["sample_id"]: s["pred"] for s in samples}
    for r in rows:
        if (r["attack_key"], r["defense_key"]) == (a_key, d_key):
            assert r["restored_pred"] == by_id[r["sample_id"]]


def test_examples_do_not_depend_on_the_sharding(sweep_run, tmp_path) -> None:
    cfg, run_id = sweep_run
    other = parse_config(sweep_config(tmp_path, shard_size=10, batch_size=5))
    summary = run(other)
    assert summary.ok and summary.n_shards == 2 and summary.run_id != run_id
    a, b = _examples_by_unit(cfg.results_dir, run_id), _examples_by_unit(other.results_dir, summary.run_id)
    assert sorted(a) == sorted(b) and len(a) == 16
    for key in a:
        assert a[key] == b[key], key


def test_no_examples_by_default(tmp_path) -> None:
    cfg = parse_config(
        tiny_config(
            tmp_path,
            dataset={"name": "mnist", "params": {"root": str(mnist_root(tmp_path)), "split": "test"}, "limit": 5},
            attacks=[{"name": "clean"}],
            defenses=[{"name": "vanilla"}],
            cluster={"in_process": True, "torch_threads": 1},
        )
    )
    summary = run(cfg)
    assert summary.ok and read_examples(cfg.results_dir, summary.run_id).num_rows == 0
    assert not (Path(cfg.results_dir) / "examples").exists()


def test_example_slots_follow_the_run_order() -> None:
    assert example_slots(0, 5, 2, 5) == [0, 1]
    assert example_slots(1, 5, 7, 5) == [0, 1]
    assert example_slots(1, 5, 2, 5) == []
    assert example_slots(0, 4, 9, 3) == [0, 1, 2]


def test_segmentation_examples_have_label_maps_and_unseen_pixels() -> None:
    setup = make_task("segmentation", n=1, size=(24, 24))
    maker = ExampleMaker(
        setup.adapter, "segmentation", NUM_CLASSES, 255, ["hflip", {"name": "rotate", "degrees": [30, 30]}], 0
    )
    x = setup.x[0]
    row = maker.row((x, (x + 0.05).clamp(0, 1), x), setup.y[0])
    truth = decode_png(row["label_map"])
    assert truth.shape == (24, 24) and truth.dtype == np.uint8
    assert np.array_equal(truth == NO_LABEL_8, (setup.y[0] == 255).numpy())
    assert row["view_names"] == ["hflip", "rotate +30"] and row["clean_view_preds"] == []
    pred = decode_png(row["clean_pred_map"])
    assert np.array_equal(pred, setup.adapter.predict(x[None])[0].numpy())
    flip, rot = (decode_png(m) for m in row["clean_view_pred_maps"])
    assert (flip != NO_LABEL_8).all() and (rot == NO_LABEL_8).any() and (rot < NUM_CLASSES).any()
    grid = figures.example_grid([{**row, "position": 0}], title="seg")
    _check_png(grid)
    assert grid == figures.example_grid([{**row, "position": 0}], title="seg")


class _FakeInstances:
    """Detections: one instance of class 2 where the first channel is bright."""

    def predict(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [
            {"masks": (img[0] > 0.5).to(torch.uint8)[None], "labels": torch.tensor([2]), "scores": torch.tensor([0.9])}
            for img in x
        ]


def test_instance_predictions_merge_into_label_maps() -> None:
    masks = torch.zeros(2, 4, 4, dtype=torch.uint8)
    masks[0, :2] = 1
    masks[1, 1:3] = 1
    merged = merge_instances(
        {"masks": masks, "labels": torch.tensor([3, 5]), "scores": torch.tensor([0.9, 0.4])}, (4, 4)
    )
    assert merged[:, 0].tolist() == [3, 3, 5, 0]  # overlap: the higher score wins
    x = torch.zeros(3, 8, 8)
    x[0, 2:6, 1:4] = 1.0
    maker = ExampleMaker(_FakeInstances(), "instance", 4, None, ["hflip"], 0)
    target = {"masks": (x[0] > 0.5).to(torch.uint8)[None], "labels": torch.tensor([2])}
    row = maker.row((x, x, x), target)
    assert np.array_equal(decode_png(row["label_map"]), decode_png(row["clean_pred_map"]))
    [view] = row["clean_view_pred_maps"]
    assert np.array_equal(decode_png(view), decode_png(row["clean_pred_map"]))  # g^-1 of the flipped detection


# ------------------------------------------------------------------------------------------------ status
def test_missing_and_partial_runs_are_flagged(sweep_run, tmp_path) -> None:
    cfg, run_id = sweep_run
    results = tmp_path / "results"
    shutil.copytree(cfg.results_dir, results)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "a_table6.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (configs / "b_never.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path / "c", name="never")))
    (configs / "c_broken.yaml").write_text("name: broken\n")
    exps = X.experiments_from_configs(sorted(configs.glob("*.yaml")))
    assert [e.name for e in exps] == ["table6", "never", "c_broken"] and exps[0].run_id == run_id
    X.write_report(results, tmp_path / "out", exps)
    index = (tmp_path / "out" / "README.md").read_text()
    assert f"| `{run_id}` | complete |" in index
    assert "| [never](never.md) | attack_x_defense |" in index and index.count("| not run |") == 1
    assert "| config error |" in index
    assert "**Not run**" in (tmp_path / "out" / "never.md").read_text()
    assert "**Config error**" in (tmp_path / "out" / "c_broken.md").read_text()

    # Delete one shard file and record a failure: partial, everywhere it is shown.
    shard = R.list_shards(results, run_id)[3]
    unit = R.read_shard_unit(shard)
    shard.unlink()
    X.write_report(results, tmp_path / "out", exps)
    assert (
        f"| `{run_id}` | partial: 31/32 shards, see `equi status {run_id}` |"
        in (tmp_path / "out" / "README.md").read_text()
    )
    R.mark_failed(results, run_id, f"{unit['attack_key']}.{unit['defense_key']}", unit["shard"], "boom")
    X.write_report(results, tmp_path / "out", exps)
    index = (tmp_path / "out" / "README.md").read_text()
    flag = f"partial: 31/32 shards, 1 failed, see `equi status {run_id}`"
    assert f"| `{run_id}` | {flag} |" in index
    assert f"**Status: {flag}**" in (tmp_path / "out" / "table6.md").read_text()


def test_report_section_does_not_change_the_run_id(tmp_path) -> None:
    base = tiny_config(tmp_path)
    ids = {
        parse_config({**base, "report": report}).run_id()
        for report in (
            {},
            {"title": "Table 6"},
            {"experiment": "t6", "layout": "eps_v_sweep", "examples": 4},
            {"layout": "k_sweep", "examples": 0},
        )
    }
    assert len(ids) == 1
    assert parse_config({**base, "seed": 4}).run_id() not in ids


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_report_all_and_single_run(sweep_run, tmp_path) -> None:
    cfg, run_id = sweep_run
    cli = CliRunner()
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "table6.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "docs"
    r = cli.invoke(app, ["report", "--all", "--configs", str(configs), "--out", str(out), "-r", cfg.results_dir])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "table6-eps_v-accuracy.png",
        "table6-examples-2-pgd.png",
        "table6.md",
    ]
    r = cli.invoke(app, ["report", run_id, "-r", cfg.results_dir, "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "one" / "table6.md").read_bytes() == (out / "table6.md").read_bytes().replace(
        b" (config `" + str(configs / "table6.yaml").encode() + b"`)", b""
    )
    assert not (tmp_path / "one" / "README.md").exists()
    r = cli.invoke(app, ["report", run_id, "-r", cfg.results_dir])
    assert r.exit_code == 0 and "| attack | vanilla | equivariance (eps_v=0) |" in r.stdout
    r = cli.invoke(app, ["report", run_id, "-r", cfg.results_dir, "-f", "csv"])
    assert r.exit_code == 0 and r.stdout.startswith("table,attack,defense,value")
    for bad in (["report"], ["report", run_id, "--all"], ["report", run_id, "--configs", str(configs)]):
        assert cli.invoke(app, [*bad, "-r", cfg.results_dir]).exit_code == 2, bad


def test_equivariance_and_ablation_pages_of_the_same_run(sweep_run, tmp_path) -> None:
    cfg, run_id = sweep_run
    parquet = pq.read_table(R.results_table_path(cfg.results_dir, run_id)).to_pylist()

    def score(metric: str, attack: str, eps_v: float | None) -> str:
        r = next(
            r
            for r in parquet
            if r["metric"] == metric and r["attack"] == attack and json.loads(r["defense_params"]).get("eps_v") == eps_v
        )
        return f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"

    table = X.equivariance_table(_labelled_rows(cfg.results_dir, run_id))
    assert table is not None and table.columns == ["mnist"]
    assert table.rows[:2] == ["clean images", "clean images restored by equivariance (eps_v=0)"]
    assert table.cells[("pgd images", "mnist")] == score("equivariance_before", "pgd", None)
    restored = "pgd images restored by equivariance (eps_v=16)"
    assert table.cells[(restored, "mnist")] == score("equivariance_after", "pgd", 16)
    n = {r["n_samples"] for r in parquet}
    assert f"n = {n.pop()} images per cell" in table.notes and not n
    pages = {
        layout: X.render_experiment(cfg.results_dir, X.Experiment("e", "E", layout, run_id)).markdown
        for layout in ("equivariance", "ablation", "k_sweep", "attack_x_defense")
    }
    assert "| images | mnist |" in pages["equivariance"]
    assert "| defense | - | eps_v=0 | eps_v=16 | eps_v=32 |" in pages["ablation"]
    assert "no defense of this run varies K" in pages["k_sweep"]
    assert "## Tables" in pages["attack_x_defense"] and "## Sweep" not in pages["attack_x_defense"]
    assert all("(e-examples-2-pgd.png)" in p for p in pages.values())


def test_tables_state_the_sample_count_and_accuracy_standard_error() -> None:
    def row(attack: str, metric: str, value: float, n: int) -> dict:
        return {
            "attack": attack,
            "attack_params": "{}",
            "defense": "vanilla",
            "defense_params": "{}",
            "metric": metric,
            "value": value,
            "n_samples": n,
            "shards_done": 1,
            "shards_total": 1,
        }

    acc = build_tables([row("clean", "accuracy", 0.9, 20), row("pgd", "accuracy", 0.5, 20)])[0]
    assert "n = 20 images per cell: one image = 5.00 points, standard error up to 11.2 points" in acc.notes
    miou = build_tables([row("clean", "miou", 0.4, 8)])[0]
    assert "n = 8 images per cell" in miou.notes and not any("standard error" in n for n in miou.notes)


def test_results_md_tables_are_the_generated_pages_tables() -> None:
    """docs/RESULTS.md is its template with every table copied from docs/results/ (scripts/render_results.py)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(repo / "scripts" / "render_results.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    template = (repo / "docs" / "RESULTS.template.md").read_text()
    assert template.count("{{table ") >= 8
