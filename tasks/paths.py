"""Paths a config names must stay inside the roots the user declared (see README, "Security defaults").

- A relative path (``cache_dir``, ``results_dir``, ``model.checkpoint``, a dataset's ``root`` / ``*_root`` /
  ``*_dir`` / ``*_file`` / ``*_path`` parameter) is relative to the working directory and must stay inside it,
  neither leaving it by ``..`` nor through a symlink that resolves elsewhere.
- An absolute path (also one that ``${VAR}`` expands to, as in ``configs/paper/``) is the user's explicit choice and
  declares its own root; it may not contain ``..``.
- No path may hold a control character (NUL, newline, escape, ...), with or without ``--allow-outside-roots``.
- Inside the output roots, the folders equirobust writes into (``samples/``, ``results/``, ``runs/``,
  ``failures/``, ``locks/``) must not be symlinks leading outside; inside a data root, loaders refuse files that
  resolve outside it (:func:`equicore.datasets.base.check_inside`).

``--allow-outside-roots`` (which sets ``EQUI_ALLOW_OUTSIDE_ROOTS=1`` for the process and its local workers) lifts
these checks. The variable cannot be set from a config, so a config from a stranger cannot lift them itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from equicore.datasets.base import ALLOW_OUTSIDE_ROOTS_ENV, outside_roots_allowed
from tasks.config import ConfigError, RunConfig
from tasks.config_checks import is_path_param, shown
from tasks.runtime import RANDOM_INIT

__all__ = ["ALLOW_OUTSIDE_ROOTS_ENV", "check_config_paths", "check_output_tree", "config_paths"]

_OUTPUT_SUBDIRS = ("samples", "results", "runs", "failures", "locks")
_HINT = "pass --allow-outside-roots to allow it"


def config_paths(cfg: RunConfig) -> Iterator[tuple[str, str]]:
    """(field, path) for every path a config names."""
    yield "cache_dir", cfg.cache_dir
    yield "results_dir", cfg.results_dir
    if cfg.model.checkpoint not in (None, RANDOM_INIT):
        yield "model.checkpoint", cfg.model.checkpoint
    if cfg.model.file is not None:
        yield "model.file", cfg.model.file
    for key, value in cfg.dataset.params.items():
        if is_path_param(key) and isinstance(value, str):
            yield f"dataset.params.{key}", value


def check_path(field: str, value: str, cwd: Path) -> None:
    """ConfigError naming `field` when `value` escapes its root (rules in the module docstring)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        if ".." in path.parts:
            raise ConfigError(f"{field}: {value!r} contains '..'; write the absolute path without it ({_HINT})")
        return
    lexical = Path(os.path.normpath(cwd / path))
    if not lexical.is_relative_to(cwd):
        raise ConfigError(f"{field}: {value!r} leaves the working directory {cwd} through '..' ({_HINT})")
    real = lexical.resolve()
    if not real.is_relative_to(cwd.resolve()):
        raise ConfigError(
            f"{field}: {value!r} resolves to {real} through a symlink, outside the working directory {cwd} ({_HINT})"
        )


def check_config_paths(cfg: RunConfig, cwd: Path | None = None) -> None:
    """Check every path of `cfg` before anything is read or written."""
    for field, value in config_paths(cfg):
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ConfigError(f"{field}: {shown(value)} contains a control character (NUL, newline, escape, ...)")
    if outside_roots_allowed():
        return
    cwd = Path(os.path.abspath(cwd or Path.cwd()))
    for field, value in config_paths(cfg):
        check_path(field, value, cwd)


def check_output_tree(cfg: RunConfig) -> None:
    """The folders equirobust writes into must resolve inside their output root (no symlink leading outside)."""
    if outside_roots_allowed():
        return
    results, cache = Path(cfg.results_dir), Path(cfg.cache_dir)
    candidates = [("results_dir", results, results / name) for name in _OUTPUT_SUBDIRS]
    if cache.is_dir():
        candidates += [("cache_dir", cache, entry) for entry in cache.iterdir()]
    for field, root, sub in candidates:
        if sub.is_symlink() and not sub.resolve().is_relative_to(root.resolve()):
            raise ConfigError(f"{field}: {sub} is a symlink to {sub.resolve()}, outside {root} ({_HINT})")
