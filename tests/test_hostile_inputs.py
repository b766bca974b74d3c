"""Hostile inputs (README, "Bad-input catalogue", the rows from `shipped_weights_altered` on): checkpoints, images
and SQL made to break or abuse a run, and the findings of the reliability/security review (altered weights, an
undecodable image in a lazily read dataset, a query that never ends, an unknown output format).

Each case holds what the catalogue promises (same machinery as tests/test_bad_input_catalogue.py): exit code 2, one
line starting with ``error:`` that names the problem, a completed run in the same results and cache directories
byte-identical afterwards, nothing created (no marker of code that ran, no file a query wrote), under 10 s.

Images are checked before any compute: ``equicore.datasets.scan.check_samples`` loads every selected sample at plan
time, so a bad file in a dataset that decodes lazily (ImageNet folders, Cityscapes, VOC, COCO) is named then instead
of failing its shard (and dropping the shard's good images) on a worker.
"""

from __future__ import annotations

import pickle
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from equicore.models import checkpoint as C
from equicore.models import common
from tests.pipeline_helpers import BAD_INPUT_SECONDS, REPO, timed_call
from tests.test_bad_input_catalogue import (
    IMAGENET_FIXTURE,
    CompletedRun,
    Outcome,
    _cli,
    _lenet_state,
    _RunsCode,
    completed_run,  # noqa: F401  (a fixture, used by kept_run)
    snapshot,
)

CITYSCAPES_FIXTURE = REPO / "tests" / "fixtures" / "datasets" / "cityscapes"
SHIPPED_LENET = "mnist_lenet5_clntrained.pt"
MARKER = "code-ran"  # a file that only appears if a payload executed


# ---------------------------------------------------------------------------------------------- how cases run
@pytest.fixture(scope="module")
def kept_run(completed_run: CompletedRun) -> CompletedRun:  # noqa: F811  (the imported fixture, injected by pytest)
    """A run completed before the hostile inputs, in the results and cache folders they are run against (the
    catalogue's own fixture, so both files set it up one way)."""
    return completed_run


@dataclass(frozen=True)
class Hostile:
    id: str
    bad_input: str  # as in the README table
    run: Callable[[Path, CompletedRun, pytest.MonkeyPatch], Outcome]
    expected: tuple[str, ...]  # parts of the one-line message


def config(id: str, bad_input: str, mutate: Callable[..., None], *expected: str) -> Hostile:
    """A run of the completed run's config changed by ``mutate(cfg, tmp[, monkeypatch])``."""

    def run(tmp: Path, done: CompletedRun, mp: pytest.MonkeyPatch) -> Outcome:
        cfg = yaml.safe_load(yaml.safe_dump(done.cfg))
        if mutate.__code__.co_argcount == 3:
            mutate(cfg, tmp, mp)
        else:
            mutate(cfg, tmp)
        path = tmp / "hostile.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return _cli("run", str(path), "-q")

    return Hostile(id, bad_input, run, expected)


def query(
    id: str,
    bad_input: str,
    sql: str,
    *expected: str,
    flags: tuple[str, ...] = (),
    results: Callable[[Path, CompletedRun], Path] | None = None,
) -> Hostile:
    """``equi query SQL`` on the completed run's results (or on the folder ``results(tmp, run)`` makes);
    ``{tmp}`` and ``{results}`` in the SQL are those folders."""

    def run(tmp: Path, done: CompletedRun, mp: pytest.MonkeyPatch) -> Outcome:
        root = results(tmp, done) if results is not None else done.results_dir
        return _cli("query", sql.format(tmp=tmp, results=root), "-r", str(root), *flags)

    return Hostile(id, bad_input, run, expected)


def _results_with_a_link_out(tmp: Path, done: CompletedRun) -> Path:
    """A copy of the completed run's results holding ``secret.csv``, a symlink to a file outside them."""
    root = tmp / "results"
    shutil.copytree(done.results_dir, root)
    (tmp / "secret.csv").write_text("password\nhunter2\n")
    (root / "secret.csv").symlink_to(tmp / "secret.csv")
    return root


# ---------------------------------------------------------------------------------------------- checkpoints
def _save(cfg: dict, tmp: Path, state: Any, name: str = "weights.pt", **kw: Any) -> Path:
    path = tmp / name
    torch.save(state, path, **kw)
    cfg["model"]["checkpoint"] = str(path)
    return path


def _shipped_copy(tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    """The shipped LeNet weights and card in a folder that stands in for the package's weights folder."""
    folder = tmp / "weights"
    folder.mkdir()
    for name in (SHIPPED_LENET, f"{SHIPPED_LENET}.card.json"):
        shutil.copy(common.WEIGHTS_DIR / name, folder / name)
    mp.setattr(common, "WEIGHTS_DIR", folder)
    mp.setattr(C, "SHIPPED_DIR", folder.resolve())
    return folder


def _shipped_altered(cfg: dict, tmp: Path, mp: pytest.MonkeyPatch) -> None:
    folder = _shipped_copy(tmp, mp)
    state = C.load_checkpoint(folder / SHIPPED_LENET)
    state["linear2.bias"][3] += 0.5  # a quiet backdoor: one class favoured
    torch.save(state, folder / SHIPPED_LENET)


def _shipped_without_card(cfg: dict, tmp: Path, mp: pytest.MonkeyPatch) -> None:
    (_shipped_copy(tmp, mp) / f"{SHIPPED_LENET}.card.json").unlink()


def _card_mismatch(cfg: dict, tmp: Path) -> None:
    path = _save(cfg, tmp, _lenet_state())
    C.card_path(path).write_text('{"weights_digest": "' + "0" * 64 + '"}\n')


class _RunsShell:
    """A plain pickle payload: unpickled without weights_only it would run ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _raw_pickle(cfg: dict, tmp: Path) -> None:
    (tmp / "weights.pt").write_bytes(pickle.dumps({"conv1.weight": _RunsShell(tmp / MARKER)}))
    cfg["model"]["checkpoint"] = str(tmp / "weights.pt")


def _garbage(data: bytes) -> Callable[[dict, Path], None]:
    def mutate(cfg: dict, tmp: Path) -> None:
        (tmp / "weights.pt").write_bytes(data)
        cfg["model"]["checkpoint"] = str(tmp / "weights.pt")

    return mutate


def _checkpoint_dir(cfg: dict, tmp: Path) -> None:
    (tmp / "weights.pt").mkdir()
    cfg["model"]["checkpoint"] = str(tmp / "weights.pt")


# ---------------------------------------------------------------------------------------------- images
def _imagenet(cfg: dict, tmp: Path) -> Path:
    """A copy of the 6-image ImageNet fixture (5 classes) run by an untrained 5-class ResNet-50 at 32x32; the
    folder of its last class (a bad file placed there sorts after the first sample the model is checked on)."""
    root = tmp / "imagenet"
    shutil.copytree(IMAGENET_FIXTURE, root)
    cfg["dataset"] = {"name": "imagenet", "params": {"root": str(root), "fraction": 1.0, "resize": 40, "crop": 32}}
    cfg["model"] = {
        "name": "resnet50",
        "checkpoint": "none",
        "params": {"num_classes": 5},
        "adapter": {"feature_layer": "layer4"},
    }
    return sorted(p for p in (root / "val").iterdir() if p.is_dir())[-1]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit grey pixels but holds only a few bytes of them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _imagenet_file(name: str, data: Callable[[Path], bytes]) -> Callable[[dict, Path], None]:
    def mutate(cfg: dict, tmp: Path) -> None:
        folder = _imagenet(cfg, tmp)
        (folder / name).write_bytes(data(folder))

    return mutate


def _first_jpeg(folder: Path) -> bytes:
    return next(p for p in sorted(folder.iterdir()) if p.suffix == ".JPEG").read_bytes()


def _imagenet_symlink(cfg: dict, tmp: Path) -> None:
    folder = _imagenet(cfg, tmp)
    (tmp / "outside.JPEG").write_bytes(_first_jpeg(folder))
    (folder / "zz_link.JPEG").symlink_to(tmp / "outside.JPEG")


def _cityscapes_rgb_label(cfg: dict, tmp: Path) -> None:
    root = tmp / "cityscapes"
    shutil.copytree(CITYSCAPES_FIXTURE, root)
    label = sorted((root / "gtFine" / "val").rglob("*_labelIds.png"))[-1]
    with Image.open(label) as img:
        img.convert("RGB").save(label)  # labelIds as an RGB picture: no class ids any more
    cfg["dataset"] = {"name": "cityscapes", "params": {"root": str(root), "split": "val", "size": [32, 64]}}
    cfg["model"] = {"name": "drn_d_22_seg", "checkpoint": "none", "params": {"num_classes": 19}}
    cfg.update(shard_size=2, batch_size=2)


def _mnist_big_digit(cfg: dict, tmp: Path) -> None:
    root = tmp / "data" / "mnist"
    shutil.copytree(Path(cfg["dataset"]["params"]["root"]), root)
    Image.new("L", (280, 280)).save(root / "test" / "mnist_00_7.png")
    cfg["dataset"]["params"]["root"] = str(root)


# ---------------------------------------------------------------------------------------------- the cases
_ALTERED = "shipped weights "
CASES: list[Hostile] = [
    # --- the review's findings
    config(
        "shipped_weights_altered",
        "shipped weights altered after installation (one bias changed; their card records the digest)",
        _shipped_altered,
        _ALTERED,
        f"{SHIPPED_LENET} do not match their card: weights digest ",
        " (file) vs 4fcd4b63d585f78e6895eb605dbae3233c3c4ccd9764b5825bc792662a2ec501 (recorded in ",
    ),
    config(
        "imagenet_undecodable_image",
        "an undecodable image in an ImageNet-style folder (read lazily, so found by the plan-time scan)",
        _imagenet_file("zz_garbage.png", lambda f: b"\x89PNG\r\n\x1a\n not really a png"),
        "zz_garbage.png: cannot decode image (UnidentifiedImageError",
    ),
    query(
        "query_never_ends",
        "a query that never ends (recursive CTE), `--timeout-s 1`",
        "with recursive t(n) as (select 1 union all select n + 1 from t) select count(*) from t",
        "the query was stopped after 1 s (the --timeout-s limit)",
        flags=("--timeout-s", "1"),
    ),
    query(
        "query_cross_join_rows",
        "a cross join that explodes (80^3 rows), default `--max-rows`",
        "select * from samples a, samples b, samples c",
        "the query returns more than 100000 rows (the --max-rows limit)",
    ),
    query(
        "query_unknown_format",
        "an unknown output format (`equi query -f xml`)",
        "select 1",
        "--format: expected table, csv, json, got 'xml'",
        flags=("-f", "xml"),
    ),
    # --- hostile checkpoints
    config(
        "shipped_weights_without_card",
        "shipped weights whose card was removed",
        _shipped_without_card,
        _ALTERED,
        "have no card with a weights digest",
    ),
    config(
        "checkpoint_card_mismatch",
        "a checkpoint whose card records other weights",
        _card_mismatch,
        "weights.pt does not match its card: weights digest ",
        "vs 0000000000000000000000000000000000000000000000000000000000000000 (recorded in weights.pt.card.json)",
    ),
    config(
        "checkpoint_raw_pickle_with_code",
        "a plain pickle (not torch.save) whose payload runs a shell command",
        _raw_pickle,
        "refusing to load ",
        "weights.pt: it is not a checkpoint of tensors that the safe loader (weights_only=True) can read",
    ),
    config(
        "checkpoint_legacy_pickle_with_code",
        "a legacy (non-zip) torch file carrying code",
        lambda c, t: _save(c, t, {"conv1.weight": _RunsCode(t / MARKER)}, _use_new_zipfile_serialization=False),
        "refusing to load ",
        "it contains Python objects other than tensors (weights_only=True); Unsupported global",
    ),
    config("checkpoint_zero_bytes", "a zero-byte checkpoint", _garbage(b""), "weights.pt is truncated or corrupt"),
    config(
        "checkpoint_garbage",
        "a checkpoint of random bytes",
        _garbage(bytes(range(256)) * 64),
        "weights.pt",
        "refusing to load",
    ),
    config(
        "checkpoint_not_a_state_dict",
        "a checkpoint holding one tensor, not a state_dict",
        lambda c, t: _save(c, t, torch.zeros(3)),
        "weights.pt does not hold a state_dict (found Tensor)",
    ),
    config(
        "checkpoint_non_tensor_entries",
        "a state_dict with non-tensor entries",
        lambda c, t: _save(c, t, {**_lenet_state(), "conv1.weight": [1, 2, 3]}),
        "weights.pt does not hold a state_dict of tensors: non-tensor entries ['conv1.weight']",
    ),
    config(
        "checkpoint_extra_keys",
        "a state_dict with an extra tensor (`backdoor.weight`)",
        lambda c, t: _save(c, t, {**_lenet_state(), "backdoor.weight": torch.ones(2)}),
        "weights.pt does not fit model 'lenet5_mnist_clean': unexpected [backdoor.weight]",
    ),
    config(
        "checkpoint_is_a_directory",
        "a checkpoint path that is a directory",
        _checkpoint_dir,
        "checkpoint is not a file: ",
    ),
    # --- hostile images (an ImageNet-style folder: decoded lazily, found by the plan-time scan)
    config(
        "image_zero_bytes",
        "a zero-byte image",
        _imagenet_file("zz_empty.JPEG", lambda f: b""),
        "zz_empty.JPEG: cannot decode image (UnidentifiedImageError",
    ),
    config(
        "image_truncated",
        "a truncated JPEG (its first half)",
        _imagenet_file("zz_cut.JPEG", lambda f: _first_jpeg(f)[: len(_first_jpeg(f)) // 2]),
        "zz_cut.JPEG: cannot decode image (OSError: image file is truncated",
    ),
    config(
        "image_decompression_bomb",
        "a decompression bomb (a PNG declaring 100000 x 100000 pixels)",
        _imagenet_file("zz_bomb.png", lambda f: _png_header(100_000, 100_000)),
        "zz_bomb.png: cannot decode image (DecompressionBombError: Image size (10000000000 pixels) exceeds limit",
    ),
    config(
        "image_over_pixel_limit",
        "an image over PIL's `MAX_IMAGE_PIXELS` (10000 x 10000, where PIL only warns)",
        _imagenet_file("zz_huge.png", lambda f: _png_header(10_000, 10_000)),
        "zz_huge: image too large (DecompressionBombWarning: Image size (100000000 pixels) exceeds limit",
    ),
    config(
        "image_symlink_outside_root",
        "an image that is a symlink out of the dataset root",
        _imagenet_symlink,
        "zz_link.JPEG: resolves to ",
        "outside the dataset root",
    ),
    config(
        "label_wrong_mode",
        "a Cityscapes label map saved as RGB (wrong mode)",
        _cityscapes_rgb_label,
        "_gtFine_labelIds.png: expected a single-channel or palette label PNG, got mode RGB",
    ),
    config(
        "image_wrong_size",
        "an MNIST digit of 280 x 280 pixels",
        _mnist_big_digit,
        "mnist_00_7.png: expected a 28x28 digit, got 280x280",
    ),
    # --- hostile SQL
    query("sql_attach", "`ATTACH` a database file", "ATTACH '{tmp}/x.duckdb' AS x", "got ATTACH"),
    query(
        "sql_read_outside_results",
        "reading a file outside the results directory",
        "select * from read_csv('/etc/passwd')",
        "Permission Error",
        "/etc/passwd",
    ),
    query(
        "sql_glob_outside_results",
        "listing files outside the results directory",
        "select * from glob('/etc/*')",
        "Permission Error",
    ),
    query(
        "sql_copy_out",
        "`COPY` the results to a file",
        "COPY (select * from results) TO '{tmp}/x.csv'",
        "only read-only queries are allowed",
        "got COPY",
    ),
    query(
        "sql_symlink_out_of_results",
        "reading a symlink in the results directory that leads outside it",
        "select * from read_csv('{results}/secret.csv')",
        "Permission Error: Cannot access file ",
        results=_results_with_a_link_out,
    ),
    query(
        "sql_dotdot_out_of_results",
        "reading `RESULTS/../file` (a path that climbs out)",
        "select * from read_csv('{results}/../hostile.yaml')",
        "Permission Error: Cannot access file ",
    ),
    query("sql_export", "`EXPORT DATABASE`", "EXPORT DATABASE '{tmp}/x'", "got EXPORT"),
    query("sql_install", "`INSTALL` an extension", "INSTALL httpfs", "only read-only queries are allowed"),
    query(
        "sql_set_config",
        "re-enabling file access (`SET enable_external_access = true`)",
        "SET enable_external_access = true",
        "got SET",
    ),
    query(
        "sql_two_statements",
        "a read followed by a write (`select 1; drop view results`)",
        "select 1; drop view results",
        "expected exactly one SQL statement, got 2",
    ),
    query(
        "sql_cross_join_memory",
        "a cross join DuckDB materialises (10^9 x 10^9 rows), `--memory-limit 256MB`",
        "select * from range(1000000000) a, range(1000000000) b",
        "Out of Memory Error: ",
        "the query needs more memory than the --memory-limit (256MB); narrow it, or raise --memory-limit",
        flags=("--memory-limit", "256MB"),
    ),
    query(
        "sql_cross_join_never_ends",
        "a cross join whose count never ends (80^6 rows), `--timeout-s 1`",
        "select count(*) from samples a, samples b, samples c, samples d, samples e, samples f",
        "the query was stopped after 1 s (the --timeout-s limit)",
        flags=("--timeout-s", "1"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_fails_in_one_line_and_keeps_the_completed_run(
    case: Hostile, kept_run: CompletedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(kept_run)
    (code, text), seconds = timed_call(lambda: case.run(tmp_path, kept_run, monkeypatch))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    message = lines[0]
    assert code == 2 and message.startswith("error: "), (code, message)
    for part in case.expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert snapshot(kept_run) == before, "a hostile input changed the completed run's files"
    assert not (tmp_path / MARKER).exists(), "a payload ran"
    assert not any((tmp_path / name).exists() for name in ("x.csv", "x", "x.duckdb")), "a query wrote a file"
    assert seconds < BAD_INPUT_SECONDS, f"{case.id} took {seconds:.1f} s"


def test_hostile_cases_are_in_the_readme() -> None:
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    readme = (REPO / "README.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in readme]
    assert not missing, f"README bad-input catalogue lacks {missing}"
