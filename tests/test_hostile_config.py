"""What a hostile config (or command line) does: the bad-input catalogue's rows for network exposure, hostile YAML,
resource exhaustion, type confusion, conflicting fields and hostile paths (README, "Bad-input catalogue").

Each case runs ``equi run`` in process (typer's CliRunner) from an empty working directory and asserts: exit code 2,
one line naming the problem, nothing written (no results or cache directory, no file anywhere under the test's
folder but the inputs it made), in under 10 s. Related: tests/test_bad_input_catalogue.py (the other rows),
tests/test_security.py (paths, code in configs), tests/test_configs.py.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.pipeline_helpers import BAD_INPUT_SECONDS, REPO, timed_call, tiny_config

runner = CliRunner()


def base_config(tmp: Path) -> dict[str, Any]:
    """The tiny MNIST config, on a local cluster (so network flags apply), writing under tmp/results, tmp/cache."""
    return tiny_config(tmp, cluster={"torch_threads": 1, "connect_timeout_s": 1})


@dataclass(frozen=True)
class Case:
    id: str
    bad_input: str  # as in the README table
    make: Callable[[Path], list[str]]  # builds the inputs under a folder; the equi arguments
    expected: tuple[str, ...]  # parts of the one-line message


def _write(tmp: Path, text: str | bytes, name: str = "bad.yaml") -> Path:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def config(id: str, bad_input: str, mutate: Callable[[dict], Any], *expected: str, flags: tuple = ()) -> Case:
    """A config changed by ``mutate`` (which edits it in place), written as YAML."""

    def make(tmp: Path) -> list[str]:
        cfg = base_config(tmp)
        mutate(cfg)
        return ["run", str(_write(tmp, yaml.safe_dump(cfg))), "-q", *flags]

    return Case(id, bad_input, make, expected)


def text(id: str, bad_input: str, build: Callable[[str], str | bytes], *expected: str) -> Case:
    """A config file with the text ``build(base config as block YAML)``."""

    def make(tmp: Path) -> list[str]:
        return ["run", str(_write(tmp, build(yaml.safe_dump(base_config(tmp), sort_keys=False)))), "-q"]

    return Case(id, bad_input, make, expected)


def flags(id: str, bad_input: str, args: Callable[[Path], list[str]], *expected: str) -> Case:
    """The base config with extra command-line arguments ``args(tmp)``."""

    def make(tmp: Path) -> list[str]:
        return ["run", str(_write(tmp, yaml.safe_dump(base_config(tmp)))), "-q", *args(tmp)]

    return Case(id, bad_input, make, expected)


def _set(*keys: str, value: Any) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        d: Any = cfg
        for k in keys[:-1]:
            d = d[int(k)] if isinstance(d, list) else d.setdefault(k, {})
        d[int(keys[-1]) if isinstance(d, list) else keys[-1]] = value

    return mutate


def _both(*mutations: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        for m in mutations:
            m(cfg)

    return mutate


def _billion_laughs(base: str) -> str:
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(levels) + "\n" + base + "laughs: *a8\n"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SILENT: list[socket.socket] = []  # listening sockets that never answer (closed at the end of the module)


def _silent_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    _SILENT.append(s)
    return s.getsockname()[1]


def _symlinked_results(tmp: Path) -> list[str]:
    (tmp / "outside").mkdir()
    (tmp / "work" / "out").symlink_to(tmp / "outside")
    cfg = {**base_config(tmp), "results_dir": "out/results"}
    return ["run", str(_write(tmp, yaml.safe_dump(cfg))), "-q"]


def _replace(old: str, new: str) -> Callable[[str], str]:
    def build(base: str) -> str:
        assert old in base
        return base.replace(old, new, 1)

    return build


# ---------------------------------------------------------------------------------------------- the cases
NETWORK = [
    config(
        "config_listens_on_all_interfaces",
        "`cluster.host: 0.0.0.0` in a config file",
        _set("cluster", "host", value="0.0.0.0"),
        "cluster.host: '0.0.0.0' is not a loopback interface",
        "pass --listen 0.0.0.0 to equi run",
    ),
    config(
        "config_names_a_scheduler",
        "`cluster.address` in a config file",
        _set("cluster", "address", value="tcp://10.1.2.3:8786"),
        "cluster.address: a config file cannot point a run at a Dask scheduler",
        "pass --cluster ADDRESS",
    ),
    flags(
        "dead_scheduler",
        "`--cluster` at an address where nothing listens",
        lambda t: ["--cluster", f"tcp://127.0.0.1:{_closed_port()}"],
        "--cluster tcp://127.0.0.1:",
        "no Dask scheduler answered within 1 s",
    ),
    flags(
        "silent_scheduler",
        "`--cluster` at a port that accepts connections and never answers",
        lambda t: ["--cluster", f"tcp://127.0.0.1:{_silent_port()}"],
        "--cluster tcp://127.0.0.1:",
        "no Dask scheduler answered within 1 s",
    ),
    flags(
        "cluster_not_an_address",
        "`--cluster` that is not a scheduler address",
        lambda t: ["--cluster", "http://example.org/x"],
        "--cluster: 'http://example.org/x' is not a Dask scheduler address",
    ),
    flags(
        "listen_not_a_host",
        "`--listen` that is not an interface",
        lambda t: ["--listen", "tcp://0.0.0.0:1"],
        "--listen: 'tcp://0.0.0.0:1' is not an IP address or host name",
    ),
    flags(
        "listen_with_cluster",
        "`--listen` together with `--cluster`",
        lambda t: ["--cluster", "tcp://127.0.0.1:8786", "--listen", "0.0.0.0"],
        "--cluster and --listen conflict",
    ),
]

HOSTILE_YAML = [
    text(
        "alias_bomb",
        "a YAML alias bomb (billion laughs: 9 levels of 9 aliases)",
        _billion_laughs,
        "bad.yaml: line ",
        "expands to more than 1000000 values through YAML aliases",
    ),
    text(
        "deep_nesting",
        "YAML nested 5000 levels deep",
        lambda base: base + "deep: " + "[" * 5000 + "]" * 5000 + "\n",
        "bad.yaml: line ",
        ": nested deeper than 32 levels",
    ),
    text(
        "duplicate_key",
        "a duplicated top-level key",
        lambda base: base + "seed: 4\n",
        "bad.yaml: line ",
        ": seed: duplicate key (first at line ",
    ),
    text(
        "duplicate_nested_key",
        "a duplicated key in a section",
        _replace("dataset:\n", "dataset:\n  limit: 3\n  limit: 4\n"),
        "dataset.limit: duplicate key",
    ),
    text(
        "non_string_key",
        "a key YAML reads as a boolean (`on:`)",
        lambda base: base + "on: 1\n",
        "key 'on' reads as a boolean, not a string",
    ),
    text(
        "recursive_alias",
        "an alias inside the node it names",
        lambda base: base + "loop: &loop [*loop]\n",
        "loop: alias *loop names a node that contains it",
    ),
    text(
        "too_many_aliases",
        "more than 100 aliases",
        lambda base: base + "x: &x 1\nmany: [" + ", ".join(["*x"] * 101) + "]\n",
        "more than 100 YAML aliases",
    ),
    text(
        "yaml_binary_tag",
        "a `!!binary` value",
        lambda base: base + "blob: !!binary aGVsbG8=\n",
        "could not determine a constructor for the tag 'tag:yaml.org,2002:binary'",
    ),
    text(
        "not_utf8",
        "a config file that is not UTF-8 text",
        lambda base: b"name: \xff\xfe\x00tiny\n",
        "bad.yaml: not UTF-8 text (byte 6",
    ),
    text(
        "two_yaml_documents",
        "two YAML documents in one file",
        lambda base: base + "---\nname: other\n",
        "expected a single document in the stream, but found another document",
    ),
    config(
        "env_var_outside_path_field",
        "`${VAR}` outside a path field (`report.title: ${HOME}`)",
        _set("report", "title", value="${HOME}"),
        "report.title: ${VAR} expands only in path fields",
    ),
]

RESOURCES = [
    text(
        "config_too_large",
        "a config file over 1 MiB",
        lambda base: base + "#" + "x" * (1 << 20) + "\n",
        "bytes; a config file may hold at most 1048576 bytes",
    ),
    Case(
        "config_is_a_device",
        "`/dev/zero` as the config",
        lambda t: ["run", "/dev/zero", "-q"],
        ("/dev/zero: not a regular file",),
    ),
    config(
        "too_many_workers",
        "`cluster.n_workers: 100000`",
        _set("cluster", "n_workers", value=100000),
        "cluster.n_workers: Input should be less than or equal to 512",
    ),
    config(
        "huge_retry_delay",
        "`retry_delay_s: [1e9]` (a 31-year wait)",
        _set("retry_delay_s", value=[1e9]),
        "retry_delay_s.0: Input should be less than or equal to 3600",
    ),
    config(
        "too_many_attacks",
        "a `lambda_e` sweep of 1000 values",
        lambda c: c["attacks"].append({"name": "aa", "eps": 8, "lambda_e": [i / 10 for i in range(1000)]}),
        "attacks: 1002 entries (suites and sweeps expanded); at most 256",
    ),
]

TYPES = [
    config(
        "bool_as_eps",
        "`eps: true`",
        _set("attacks", "1", "eps", value=True),
        "attacks.1: pgd.eps: expected a finite number, got true (a boolean)",
    ),
    config(
        "bool_as_steps",
        "`steps: true`",
        _set("attacks", "1", "steps", value=True),
        "attacks.1: pgd.steps: expected an integer >= 1, got True",
    ),
    config(
        "nan_retry_delay",
        "`retry_delay_s: [.nan]`",
        _set("retry_delay_s", value=[float("nan")]),
        "retry_delay_s.0: Input should be a finite number, got .nan",
    ),
    config(
        "bool_as_batch_size",
        "`batch_size: true`",
        _set("batch_size", value=True),
        "batch_size: Input should be a valid integer, got true (a boolean)",
    ),
    config(
        "string_as_number",
        '`shard_size: "5"`',
        _set("shard_size", value="5"),
        "shard_size: Input should be a valid integer, got '5'",
    ),
    config(
        "string_as_bool",
        '`cluster.in_process: "no"`',
        _set("cluster", "in_process", value="no"),
        "cluster.in_process: Input should be a valid boolean, got 'no'",
    ),
    config(
        "bool_in_indices",
        "`dataset.indices: [true, 2]`",
        _set("dataset", "indices", value=[True, 2]),
        "dataset.indices.0: Input should be a valid integer, got true (a boolean)",
    ),
    config(
        "number_as_attack_flag",
        "`random_init: 1`",
        _set("attacks", "1", "random_init", value=1),
        "attacks.1: pgd.random_init: expected true or false, got 1",
    ),
    config(
        "number_as_attack_target",
        "`target: 5` (a number where a name goes)",
        _set("attacks", "1", "target", value=5),
        "attacks.1: pgd.target: expected a string, got 5",
    ),
    config(
        "float_as_defense_steps",
        "`steps: 2.5` for a defense",
        _set("defenses", "1", "steps", value=2.5),
        "defenses.1: equivariance.steps: expected an integer >= 1, got 2.5",
    ),
    config(
        "nan_defense_param",
        "`eps_v: .nan` for a defense",
        _set("defenses", "1", "eps_v", value=float("nan")),
        "defenses.1: equivariance.eps_v: expected >= 0",
        "got nan",
    ),
    config(
        "defense_schedule_typo",
        "`schedule: cosin` for a defense",
        _set("defenses", "1", "schedule", value="cosin"),
        "defenses.1: equivariance.schedule: unknown step-size schedule 'cosin'; did you mean 'cosine'?",
    ),
    config(
        "defense_step_decay_gamma_zero",
        "`schedule: {name: step, gamma: 0}` for a defense",
        _set("defenses", "1", "schedule", value={"name": "step", "gamma": 0}),
        "defenses.1: equivariance.schedule.gamma: expected 0 < gamma <= 1",
    ),
    config(
        "defense_patience_zero",
        "`patience: 0` for a defense",
        _set("defenses", "1", "patience", value=0),
        "defenses.1: equivariance.patience: expected an integer >= 1, got 0",
    ),
    config(
        "number_as_dataset_param",
        "`dataset.params.split: 5`",
        _set("dataset", "params", "split", value=5),
        "dataset: mnist.split: expected a string, got 5",
    ),
    config(
        "inf_reference_eps",
        "`reference_eps: .inf`",
        _set("reference_eps", value=float("inf")),
        "reference_eps: Input should be a finite number, got .inf",
    ),
    config(
        "negative_seed",
        "`seed: -1` (failed only at the reduce step before)",
        _set("seed", value=-1),
        "seed: Input should be greater than or equal to 0",
    ),
]

CONFLICTS = [
    config(
        "limit_and_indices",
        "`dataset.limit` together with `dataset.indices`",
        _both(_set("dataset", "limit", value=3), _set("dataset", "indices", value=[0, 1])),
        "dataset: limit and indices conflict",
    ),
    config(
        "duplicate_indices",
        "`dataset.indices: [0, 0, 1]`",
        _set("dataset", "indices", value=[0, 0, 1]),
        "dataset: indices: [0] listed more than once",
    ),
    config(
        "in_process_with_workers",
        "`cluster.in_process` with `cluster.n_workers`",
        _set("cluster", value={"in_process": True, "n_workers": 2}),
        "cluster: in_process and n_workers (--workers) conflict",
    ),
    flags(
        "in_process_flag_with_cluster_flag",
        "`--in-process` together with `--cluster`",
        lambda t: ["--in-process", "--cluster", "tcp://127.0.0.1:8786"],
        "--cluster and --in-process conflict",
    ),
    config(
        "dashboard_in_process",
        "`cluster.dashboard` with `cluster.in_process`",
        _set("cluster", value={"in_process": True, "dashboard": True}),
        "cluster: in_process and dashboard conflict",
    ),
    config(
        "eval_draws_deterministic_defense",
        "`eval_draws: 4` on a defense that is not randomised",
        _set("defenses", "0", "eval_draws", value=4),
        "defenses.0: eval_draws: 4 draws of defense 'vanilla', which is not randomised",
    ),
    config(
        "min_delta_without_patience",
        "`min_delta` on a defense without `patience`",
        _set("defenses", "1", "min_delta", value=0.01),
        "defenses.1: equivariance.min_delta: 0.01 applies to early stopping, but patience is not set",
    ),
    config(
        "noise_scale_without_noise",
        "`noise_scale` on a defense with `noise: false`",
        _both(_set("defenses", "1", "noise", value=False), _set("defenses", "1", "noise_scale", value=0.5)),
        "defenses.1: equivariance.noise_scale: 0.5 scales the annealed noise, but noise is false",
    ),
    config(
        "equivariance_report_without_measure",
        "`report.layout: equivariance` with `measure.enabled: false`",
        _both(_set("report", "layout", value="equivariance"), _set("measure", "enabled", value=False)),
        "report.layout 'equivariance' (Table 4) shows the equivariance measure, but measure.enabled is false",
    ),
    config(
        "gpu_resources_on_cpu",
        "`cluster.gpu_resources: true` with `device: cpu` (tasks would wait forever)",
        _both(_set("cluster", "gpu_resources", value=True), _set("device", value="cpu")),
        "cluster.gpu_resources: true asks every task for a GPU, but device is cpu",
    ),
]

PATHS = [
    Case(
        "config_is_a_directory",
        "a directory as the config",
        lambda t: ["run", str(t), "-q"],
        (": not a regular file (a directory, device or pipe)",),
    ),
    config(
        "nul_in_path",
        'a NUL byte in a path (`results_dir: "r\\0x"`)',
        _set("results_dir", value="r\x00x"),
        "results_dir: 'r\\x00x' contains a control character",
    ),
    config(
        "absolute_path_with_dotdot",
        "an absolute path with `..`",
        _set("cache_dir", value="/tmp/../etc/equi-cache"),
        "cache_dir: '/tmp/../etc/equi-cache' contains '..'",
    ),
    Case(
        "results_dir_through_symlink",
        "a relative results directory through a symlink that leaves the working directory",
        _symlinked_results,
        ("results_dir: 'out/results' resolves to", "through a symlink, outside the working directory"),
    ),
    config("name_is_a_path", "`name: ../../x`", _set("name", value="../../x"), "name: String should match pattern"),
    config(
        "report_experiment_is_a_path",
        "`report.experiment: ../../x`",
        _set("report", "experiment", value="../../x"),
        "report.experiment: String should match pattern",
    ),
]

CASES: list[Case] = [*NETWORK, *HOSTILE_YAML, *RESOURCES, *TYPES, *CONFLICTS, *PATHS]


# ---------------------------------------------------------------------------------------------- the test
def _tree(root: Path) -> dict[str, bytes | str]:
    return {
        str(p.relative_to(root)): (f"-> {p.readlink()}" if p.is_symlink() else p.read_bytes() if p.is_file() else "/")
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module", autouse=True)
def _close_silent_sockets() -> Iterator[None]:
    yield
    for s in _SILENT:
        s.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_fails_in_one_line_and_writes_nothing(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative defaults would land here
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    args = case.make(tmp_path)
    before = _tree(tmp_path)
    result, seconds = timed_call(lambda: runner.invoke(app, args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug
    out = (result.stderr or "") + (result.stdout or "")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, out
    assert lines[0].startswith("error: "), lines[0]
    for part in case.expected:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert seconds < BAD_INPUT_SECONDS, f"{case.id} took {seconds:.1f} s"
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()
    assert _tree(tmp_path) == before, "a hostile input wrote files"


def test_every_case_is_in_the_readme_catalogue() -> None:
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    readme = (REPO / "README.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in readme]
    assert not missing, f"README bad-input catalogue lacks {missing}"
