"""``--set KEY=VALUE`` (and ``--limit``, ``--device``): edits of a config file's data before it is validated.

An override is applied to what the file holds, then everything is checked exactly like the file (types, names,
limits, no network fields, ``${VAR}`` only in paths), so ``--set`` can express nothing a file could not. ``KEY`` is a
dotted path whose list steps are indices (``attacks.1.steps``); ``VALUE`` is read as a YAML scalar or flow
collection (``2``, ``true``, ``null``, ``[hflip, rotate]``, ``{split: test}``) within the config reader's limits.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from tasks.config_errors import ConfigError
from tasks.config_yaml import parse_yaml

_KEY_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^\d+$")


def parse_override(expr: str) -> tuple[list[str], Any]:
    """``"attacks.1.steps=2"`` -> (["attacks", "1", "steps"], 2)."""
    key, sep, text = expr.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or not all(_KEY_PART.match(p) for p in parts):
        raise ConfigError(f"--set {expr!r}: expected KEY=VALUE with KEY a dotted path like attacks.1.steps")
    try:
        value = parse_yaml(text, f"--set {key}")
    except ConfigError as e:
        raise ConfigError(f"--set {expr!r}: {e}") from None
    return parts, value


def apply_override(data: dict[str, Any], expr: str) -> dict[str, Any]:
    """``data`` with one ``--set`` applied (a copy). A list step must index an existing entry; a missing mapping
    key on the way is created, and validation then names it if the config has no such field."""
    parts, value = parse_override(expr)
    out = copy.deepcopy(data)
    node: Any = out
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {expr!r}: {where}: index out of range ({len(node)} entries, 0-based)")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"--set {expr!r}: {'.'.join(parts[:depth])} is a value, not a mapping or list")
    return out


def apply_overrides(data: Any, sets: Sequence[str] = (), *, limit: int | None = None, device: str | None = None) -> Any:
    """The file's data with ``--set`` entries (in order), then ``--limit`` and ``--device`` applied."""
    if not isinstance(data, dict):
        return data  # the validator reports the top level
    for expr in sets:
        data = apply_override(data, expr)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit: expected a number of samples >= 1, got {limit}")
        dataset = dict(data.get("dataset") or {})
        if isinstance(dataset.get("indices"), list):  # the first N of the listed samples
            dataset["indices"] = dataset["indices"][:limit]
        else:
            dataset["limit"] = limit
        data = {**data, "dataset": dataset}
    if device is not None:
        data = {**data, "device": device}
    return data
