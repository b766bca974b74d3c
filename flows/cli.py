"""``equi``: run, resume, inspect, query and report robustness evaluations.

Every command prints one clear line on bad input (exit 2) instead of a traceback; a run with failed shards prints a
summary and exits 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    help="equirobust: adversarial robustness evaluation with test-time equivariance defenses (Mao et al. 2023).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

DEFAULT_RESULTS = os.environ.get("EQUI_RESULTS_DIR", ".equi/results")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIGS = REPO_ROOT / "configs" / "demo"

ResultsOpt = Annotated[
    str, typer.Option("--results-dir", "-r", help="results directory (default $EQUI_RESULTS_DIR or .equi/results)")
]
ClusterOpt = Annotated[
    str | None, typer.Option(help="existing Dask scheduler tcp:// or tls://HOST:PORT (not from configs)")
]
ListenOpt = Annotated[str | None, typer.Option(help="bind the local Dask cluster to HOST, not 127.0.0.1 (exposes it)")]
AllowOutsideOpt = Annotated[
    bool,
    typer.Option(
        "--allow-outside-roots",
        help="let config paths leave the working directory (.. or symlinks) and dataset files leave their root",
    ),
]


def _allow_outside_roots(allow: bool) -> None:
    # An environment variable, not a config key: a config cannot lift the check itself, and local Dask workers
    # (spawned after this) inherit it.
    from equicore.environment import ALLOW_OUTSIDE_ROOTS_ENV

    if allow:
        os.environ[ALLOW_OUTSIDE_ROOTS_ENV] = "1"


def _quiet_libraries(verbose: bool) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
        for name in ("distributed", "prefect", "httpx"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # Dask picks another port itself; the dashboard's address is printed as a start-up phase instead.
        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)


def _fail(message: str, code: int = 2) -> None:
    # Messages list keys and shapes in brackets ("missing keys [conv1.bias, ...]"): escaped, or rich would take them
    # for markup tags and silently drop them.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    """Run a command body; known errors become one line, not a traceback."""
    from equicore.errors import EquirobustError
    from storage.errors import StorageError

    try:
        return fn(*args, **kwargs)
    except (EquirobustError, StorageError) as e:
        _fail(str(e))
    except FileNotFoundError as e:
        _fail(f"{e.filename or e}: not found")
    except ValueError as e:  # e.g. a run id that is not a safe path component
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _run_with_progress(cfg, quiet: bool):
    from flows.cli_progress import run_with_progress
    from flows.run_options import exposure_warning
    from flows.startup import Launch

    if warning := exposure_warning(cfg):  # --listen on a non-loopback interface
        err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    # Begun before the engine (torch) is imported: a temporary Prefect API starts meanwhile.
    with Launch(cfg) as launch:
        return run_with_progress(cfg, quiet, err_console, launch)


def _print_summary(summary) -> None:
    console.print(
        f"run [bold]{summary.run_id}[/]: {summary.n_samples} samples in {summary.n_shards} shard(s); "
        f"{summary.computed} unit-shard(s) computed, {summary.skipped} already done, {len(summary.failed)} failed "
        f"({summary.seconds:.1f} s). Results: {summary.results_dir}",
        highlight=False,
        soft_wrap=True,
    )
    if summary.repaired:
        console.print(
            f"{len(summary.repaired)} damaged file(s) failed their checksums and were regenerated (listed above).",
            highlight=False,
        )
    if summary.failed:
        t = Table(title="failed shards", show_lines=False)
        for col in ("unit", "shard", "error"):
            t.add_column(col)
        for f in summary.failed:
            t.add_row(escape(f["unit"]), str(f["shard"]), escape(f["error"]))
        console.print(t)
        console.print(f"Fix the cause, then `equi resume {summary.run_id}` recomputes only these.", highlight=False)


LimitOpt = Annotated[int | None, typer.Option("--limit", help="evaluate only the first N samples (a new run id)")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda (not part of the run id)")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="override a config field, e.g. --set attacks.1.steps=2 (repeatable; checked like the file)"
    ),
]


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="run configuration (YAML)")],
    cluster: ClusterOpt = None,
    listen: ListenOpt = None,
    workers: Annotated[
        int | None, typer.Option(help="local Dask workers (default: one per GPU, else per core)")
    ] = None,
    in_process: Annotated[
        bool, typer.Option("--in-process", help="no Dask/Prefect: run shards here, in order")
    ] = False,
    results_dir: Annotated[str | None, typer.Option(help="override the config's results_dir")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="override the config's cache_dir")] = None,
    limit: LimitOpt = None,
    device: DeviceOpt = None,
    sets: SetOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the plan and its estimated cost; compute and write nothing")
    ] = False,
    report: Annotated[bool, typer.Option(help="print the report table when done")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect/Dask logs")] = False,
    allow_outside_roots: AllowOutsideOpt = False,
) -> None:
    """Run a config: attack every shard once (cached), defend and score, reduce. Re-running resumes."""
    _quiet_libraries(verbose)
    _allow_outside_roots(allow_outside_roots)
    from flows.run_options import apply_overrides
    from tasks.config import load_config

    flags = dict(cluster=cluster, listen=listen, workers=workers, in_process=in_process, results_dir=results_dir)
    cfg = _guard(load_config, config, sets or (), limit=limit, device=device)
    cfg = _guard(apply_overrides, cfg, **flags, cache_dir=cache_dir)
    if dry_run:
        from flows.cli_plan import print_dry_run

        _guard(print_dry_run, console, cfg)
        return
    summary = _guard(_run_with_progress, cfg, quiet)
    _print_summary(summary)
    if report:
        _print_report(summary.results_dir, summary.run_id, "markdown")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="run id printed by `equi run` (see `equi status`)")],
    results_dir: ResultsOpt = DEFAULT_RESULTS,
    cluster: ClusterOpt = None,
    listen: ListenOpt = None,
    device: DeviceOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    allow_outside_roots: AllowOutsideOpt = False,
) -> None:
    """Finish an interrupted or partly failed run: computes only the missing shards (and regenerates damaged ones)."""
    _quiet_libraries(verbose)
    _allow_outside_roots(allow_outside_roots)
    from flows.run_options import apply_overrides
    from storage.run_store import RunStore
    from tasks.config import parse_config
    from tasks.config_checks import without_network  # recorded --cluster / --listen are not reused: give them again

    manifest = _guard(RunStore(results_dir, run_id).read_manifest)
    cfg = _guard(parse_config, without_network(manifest["config"]), f"run {run_id} manifest")
    if cfg.run_id() != run_id:
        _fail(f"run {run_id}: its manifest's config hashes to {cfg.run_id()} (was it edited by hand?)")
    cfg = _guard(apply_overrides, cfg, cluster=cluster, listen=listen, device=device)
    summary = _guard(_run_with_progress, cfg, quiet)
    _print_summary(summary)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def status(
    run_id: Annotated[str | None, typer.Argument(help="a run id; omit to list runs")] = None,
    results_dir: ResultsOpt = DEFAULT_RESULTS,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Shards done / failed / pending, per run or per (attack, defense) of one run; a run whose process is gone is
    "interrupted" (resume it). One run also shows its model's weights file and digest."""
    from flows import cli_inspect

    if run_id is None:
        _guard(cli_inspect.print_runs, console, results_dir, as_json)
    else:
        _guard(cli_inspect.print_run_status, console, results_dir, run_id, as_json)


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="DuckDB SQL over the views `results` and `samples` (read-only)")],
    results_dir: ResultsOpt = DEFAULT_RESULTS,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, csv or json")] = "table",
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", help="stop the query after this many seconds (0: no limit)")
    ] = 60.0,
    max_rows: Annotated[
        int, typer.Option("--max-rows", help="refuse results longer than this (0: no limit)")
    ] = 100_000,
    memory_limit: Annotated[
        str, typer.Option("--memory-limit", help="DuckDB's memory for the query, e.g. 2GB (nothing spills to disk)")
    ] = "2GB",
) -> None:
    """Query results with DuckDB. Views: results (one row per metric), samples (one row per image). Limits (time,
    rows, memory) stop a runaway query with one line; the defaults match storage.query's DEFAULT_* values."""
    from flows import cli_inspect

    if fmt not in cli_inspect.QUERY_FORMATS:
        _fail(f"--format: expected {', '.join(cli_inspect.QUERY_FORMATS)}, got {fmt!r}")
    if timeout_s < 0 or max_rows < 0:
        _fail(f"--timeout-s and --max-rows: expected values >= 0 (0: no limit), got {timeout_s:g} and {max_rows}")
    limits = (timeout_s or None, max_rows or None)
    _guard(cli_inspect.print_query, console, results_dir, sql, fmt, *limits, memory_limit)


def _print_report(results_dir: str, run_id: str, fmt: str, output: Path | None = None) -> None:
    if fmt == "html":  # one self-contained page: tables, plots, example grids
        from reports.html_report import render_html_report

        text = _guard(render_html_report, results_dir, run_id)
    else:
        from reports.tables import report as render

        text = _guard(render, results_dir, run_id, fmt)
    if output:
        from storage.atomic import atomic_write_text

        _guard(atomic_write_text, output, text)  # whole or not at all: a report is never half written
        console.print(f"wrote {output}", highlight=False, soft_wrap=True)
    else:
        sys.stdout.write(text)


def _write_pages(results_dir: str, out: Path, run_id: str | None, configs: Path | None) -> None:
    from reports import experiment_pages as X
    from storage.run_store import RunStore

    if run_id is not None:
        manifest = _guard(RunStore(results_dir, run_id).read_manifest)
        cfg = manifest.get("config") or {}
        exps = [X.experiment_of(cfg.get("name") or run_id, cfg.get("report") or {}, run_id)]
    elif configs is not None:
        if not configs.is_dir():
            _fail(f"--configs: {configs} is not a directory")
        files = sorted([*configs.glob("*.yaml"), *configs.glob("*.yml")])
        if not files:
            _fail(f"--configs: no *.yaml in {configs}")
        exps = _guard(X.experiments_from_configs, files, Path.cwd().resolve())
    else:
        exps = _guard(X.experiments_from_results, results_dir)
        if not exps:
            _fail(f"no runs in {results_dir} (give --configs to list the experiments that should be there)")
    written = _guard(X.write_report, results_dir, out, exps, index=run_id is None)
    where = f"; index: {out / X.INDEX}" if run_id is None else ""
    console.print(
        f"wrote {len(written)} file(s) to {out} ({len(exps)} experiment(s)){where}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def report(
    run_id: Annotated[str | None, typer.Argument(help="run id (omit with --all)")] = None,
    results_dir: ResultsOpt = DEFAULT_RESULTS,
    fmt: Annotated[str, typer.Option("--format", "-f", help="markdown, csv or html")] = "markdown",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write to a file instead of stdout")] = None,
    all_runs: Annotated[
        bool, typer.Option("--all", help="write one page per experiment (and an index) into --out")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="folder for experiment pages and PNGs (default docs/results)")
    ] = None,
    configs: Annotated[
        Path | None,
        typer.Option(help="with --all: the experiments are these configs (*.yaml); missing/partial runs are flagged"),
    ] = None,
) -> None:
    """The paper-style table of RUN_ID (one row per attack, one column per defense); -f html -o FILE: one
    self-contained HTML report (tables, plots, example grids); with --all (or --out), Markdown pages with tables,
    plots and example grids for every experiment, and an index of what is complete."""
    if fmt not in ("markdown", "csv", "html"):
        _fail(f"--format: expected markdown, csv or html, got {fmt!r}")
    if all_runs and run_id is not None:
        _fail("give a RUN_ID or --all, not both")
    if configs is not None and not all_runs:
        _fail("--configs needs --all")
    if all_runs or out is not None:
        if run_id is None and not all_runs:
            _fail("--out needs a RUN_ID or --all")
        _write_pages(results_dir, out or Path("docs/results"), run_id, configs)
        return
    if run_id is None:
        _fail("give a RUN_ID, or --all to report every experiment")
    _print_report(results_dir, run_id, fmt, output)


@app.command()
def deploy(
    config: Annotated[Path, typer.Argument(help="run configuration (YAML)")],
    cron: Annotated[str, typer.Option(help='schedule, e.g. "0 2 * * *" for 02:00 every night')] = "0 2 * * *",
    name: Annotated[str | None, typer.Option(help="deployment name (default: the config's name)")] = None,
    timezone: Annotated[
        str | None, typer.Option("--timezone", help="IANA time zone of the schedule (default: this machine's)")
    ] = None,
    start_server: Annotated[
        bool,
        typer.Option("--start-server", help="no server running: start one for as long as this command serves"),
    ] = False,
    port: Annotated[int | None, typer.Option(help="with --start-server: its port (default: a free one)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and print the deployment, do not serve")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's own logs")] = False,
) -> None:
    """Register a scheduled Prefect deployment of CONFIG on a Prefect server and serve it (runs until Ctrl-C).

    The server: PREFECT_API_URL, else the one `equi server start` runs for the config's results_dir, else (with
    --start-server) one started here and stopped with this command. A run with failed shards ends Failed."""
    _quiet_libraries(verbose)
    from flows import cli_deploy

    code = _guard(cli_deploy.deploy, console, config, cron, name, timezone, start_server, port, dry_run, verbose)
    if code:
        raise typer.Exit(code)


server_app = typer.Typer(
    help="A local Prefect server that keeps `equi deploy` schedules, and a warm Dask cluster for the runs (127.0.0.1 "
    "only; state, database and logs under RESULTS_DIR/prefect/).",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(
    results_dir: ResultsOpt = DEFAULT_RESULTS,
    port: Annotated[int | None, typer.Option(help="port on 127.0.0.1 (default: a free one)")] = None,
    workers: Annotated[int | None, typer.Option(help="warm Dask workers (default: 1 per GPU/core; 0: none)")] = None,
) -> None:
    """Start the server and a warm Dask cluster for the runs in the background (or report them); they outlive this."""
    from flows import cli_deploy

    _guard(cli_deploy.server_start, console, results_dir, port, workers)


@server_app.command("status")
def server_status(
    results_dir: ResultsOpt = DEFAULT_RESULTS,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Whether the server runs and answers (exit 0), or not (exit 1); its URL, pid, log and warm Dask cluster."""
    from flows import cli_deploy

    raise typer.Exit(_guard(cli_deploy.server_status, console, results_dir, as_json))


@server_app.command("stop")
def server_stop(results_dir: ResultsOpt = DEFAULT_RESULTS) -> None:
    """Stop the server and its warm Dask cluster (its database and run history stay, for the next start)."""
    from flows import cli_deploy

    _guard(cli_deploy.server_stop, console, results_dir)


@app.command()
def demo(
    full: Annotated[
        bool, typer.Option("--full", help="the whole built-in benchmark instead of the demo subset")
    ] = False,
    results_dir: Annotated[str | None, typer.Option(help="override results_dir")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="override cache_dir")] = None,
    workers: Annotated[int | None, typer.Option(help="local Dask workers")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    allow_outside_roots: AllowOutsideOpt = False,
) -> None:
    """The built-in benchmark end to end: prepares data if needed, runs every task, prints the reports."""
    _quiet_libraries(False)
    _allow_outside_roots(allow_outside_roots)
    from equicore.datasets import prepare

    _guard(prepare, log=lambda m: err_console.print(m, highlight=False))
    folder = DEMO_CONFIGS.parent / ("benchmark" if full else "demo")
    _run_suite(sorted(folder.glob("*.yaml")), folder, "demo", results_dir, cache_dir, workers, quiet)


def _run_suite(configs: list[Path], folder: Path, label: str, results_dir, cache_dir, workers, quiet: bool) -> None:
    """Run several configs on one LocalCluster and Prefect API, printing each report and its wall time."""
    if not configs:
        _fail(f"no configs in {folder}")
    from flows.pipeline import run_many
    from flows.run_options import apply_overrides
    from tasks.config import load_config

    cfgs = [
        _guard(apply_overrides, _guard(load_config, p), results_dir=results_dir, cache_dir=cache_dir) for p in configs
    ]
    t0 = time.perf_counter()
    failed = False

    def run_one(cfg):
        err_console.print(f"[bold]== {cfg.name}[/]", highlight=False)
        return _guard(_run_with_progress, cfg, quiet)

    for summary in run_many(cfgs, workers, run_one):
        _print_summary(summary)
        _print_report(summary.results_dir, summary.run_id, "markdown")
        failed |= bool(summary.failed)
    console.print(f"{label}: {len(configs)} run(s) in {time.perf_counter() - t0:.0f} s", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command()
def experiments(
    names: Annotated[
        list[str] | None, typer.Argument(help="experiments to run (file-name prefixes, e.g. t1 t5); default all")
    ] = None,
    folder: Annotated[Path, typer.Option(help="folder of experiment configs")] = DEMO_CONFIGS.parent / "experiments",
    list_only: Annotated[bool, typer.Option("--list", help="list the experiments and exit")] = False,
    results_dir: Annotated[str | None, typer.Option(help="override results_dir")] = None,
    cache_dir: Annotated[str | None, typer.Option(help="override cache_dir")] = None,
    workers: Annotated[int | None, typer.Option(help="local Dask workers")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """The paper's experiments on the built-in benchmark (configs/experiments): each a normal, resumable run."""
    _quiet_libraries(False)
    configs = sorted(folder.glob("*.yaml"))
    if names:
        unknown = [n for n in names if not any(p.stem.startswith(n) for p in configs)]
        if unknown:
            _fail(f"no experiment matches {unknown} (known: {', '.join(p.stem for p in configs)})")
        configs = [p for p in configs if any(p.stem.startswith(n) for n in names)]
    if list_only:
        for p in configs:
            console.print(p.stem, highlight=False)
        return
    from equicore.datasets import prepare

    _guard(prepare, log=lambda m: err_console.print(m, highlight=False))
    _run_suite(configs, folder, "experiments", results_dir, cache_dir, workers, quiet)


@app.command()
def train(
    name: Annotated[str, typer.Argument(help="a training recipe, e.g. fashion_cnn, drn_tiny_seg")],
    out: Annotated[Path | None, typer.Option(help="output folder (default: the shipped weights folder)")] = None,
    epochs: Annotated[int | None, typer.Option(help="override the recipe's epochs")] = None,
    seed: Annotated[int | None, typer.Option(help="override the recipe's seed")] = None,
) -> None:
    """Re-train a built-in model exactly as its model card says."""
    import training

    card = _guard(training.train, name, out, epochs=epochs, seed=seed)
    console.print_json(json.dumps(card, default=str))


@app.command("train-head")
def train_head(
    kind: Annotated[str, typer.Argument(help="rotation or contrastive")],
    model: Annotated[str, typer.Argument(help="a registered model with weights, e.g. fashion_cnn, lenet5_mnist_adv")],
    out: Annotated[
        Path | None,
        typer.Option(help="a .pt file or a folder (default: the shipped weights/heads/<model>.<kind>.pt)"),
    ] = None,
    feature_layer: Annotated[
        str | None,
        typer.Option(
            help="the adapter's feature layer the head sits on (classifiers: a module name, default the demo "
            "configs' layer; Mask R-CNN: fpn.N, default fpn.0)"
        ),
    ] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="the model's weights file, or 'none' for a seeded random init (default: shipped)")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="head training epochs (default: 20)")] = None,
    limit: Annotated[int | None, typer.Option(help="train on the first N training images (default: 10000)")] = None,
    eval_limit: Annotated[
        int | None, typer.Option(help="held-out figures on the first N test images (default: 2000)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the head's init, batches, views and negative bank")] = 0,
    bank_size: Annotated[
        int | None, typer.Option(help="contrastive: negatives in the fixed bank (default: 512)")
    ] = None,
    threads: Annotated[int, typer.Option(help="torch intra-op threads")] = 2,
) -> None:
    """Train the self-supervised head of the rotation or contrastive defense on a model's frozen features."""
    from training import heads as H

    card = _guard(
        H.train_head,
        kind,
        model,
        out=out,
        epochs=epochs,
        limit=limit if limit is not None else H.DEFAULT_TRAIN_LIMIT,
        eval_limit=eval_limit if eval_limit is not None else H.DEFAULT_EVAL_LIMIT,
        feature_layer=feature_layer,
        checkpoint=checkpoint,
        seed=seed,
        bank_size=bank_size,
        threads=threads,
        log=lambda m: err_console.print(m, highlight=False),
    )
    summary = {k: card[k] for k in ("name", "checkpoint", "head", "held_out", "wall_time_s") if k in card}
    console.print_json(json.dumps(summary, default=str))


@app.command("prepare-data")
def prepare_data(
    data_dir: Annotated[Path | None, typer.Option(help="default $EQUI_DATA_DIR or ~/.cache/equirobust/data")] = None,
) -> None:
    """Install/copy the built-in benchmark's data (Fashion-MNIST, MNIST digits, backgrounds) and build scenes."""
    from equicore.datasets import prepare

    paths = _guard(prepare, data_dir, log=lambda m: err_console.print(m, highlight=False))
    console.print_json(json.dumps({k: str(v) for k, v in paths.items()}))


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="tune config: a run config plus a search: section (README)")],
    in_process: Annotated[
        bool, typer.Option("--in-process", help="no Dask/Prefect: run every candidate here, in order")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-candidate lines")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect/Dask logs")] = False,
) -> None:
    """Search a defense's optimiser options on the VALIDATION split; write the Pareto front and a tuned preset."""
    _quiet_libraries(verbose)
    from flows.cli_tune import run_tune

    _guard(run_tune, config, in_process=in_process, quiet=quiet, console=console)


@app.command("list")
def list_entries(
    kind: Annotated[
        str, typer.Argument(help="attacks, losses, defenses, models, datasets, transforms, metrics, views or schedules")
    ],
) -> None:
    """List registered names (what a config may use)."""
    from equicore import catalogue  # the registries' names without importing torch (kept in sync by a test)

    kinds = sorted(k for k in catalogue.read() if k not in ("adapters", "objectives"))
    if kind not in kinds:
        _fail(f"kind: expected one of {kinds}, got {kind!r}")
    for n in catalogue.names(kind):
        meta = {k: tuple(v) if isinstance(v, list) else v for k, v in catalogue.meta(kind, n).items()}
        line = f"{n}  {meta if meta and kind != 'views' else ''}".rstrip()
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
