"""A static catalogue of the registries' names (``catalogue.json``), for what must not import torch to answer.

``equi list`` and the first, static pass of config validation read it; everything that builds or runs looks names up
in the live registries. ``tests/test_registry_contracts.py`` fails when the file and the registries differ: after
registering an entry, rewrite it with ``python -m equicore.catalogue --write``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from equicore.errors import UnknownNameError
from equicore.registry import unknown_name_message

CATALOGUE_PATH = Path(__file__).with_name("catalogue.json")
_SCALARS = (str, int, float, bool)


def _plain(value: Any) -> Any:
    """The JSON form of a meta value ``equi list`` shows, or None for what it leaves out (classes, callables...)."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value):
        return list(value)
    return None


def build() -> dict[str, Any]:
    """The catalogue of the live registries (imports the engine)."""
    import equicore

    out: dict[str, Any] = {}
    for plural, registry in equicore.REGISTRIES.items():
        entries = {}
        for name in registry.names():
            meta = {k: _plain(v) for k, v in registry.meta(name).items()}
            entries[name] = {k: v for k, v in sorted(meta.items()) if v is not None}
        out[plural] = {"kind": registry.kind, "entries": entries}
    return out


@functools.cache
def read() -> dict[str, Any]:
    return json.loads(CATALOGUE_PATH.read_text())


def names(plural: str) -> list[str]:
    return sorted(read()[plural]["entries"])


def meta(plural: str, name: str) -> dict[str, Any]:
    return read()[plural]["entries"][name]


def check_name(plural: str, name: object) -> str:
    """``name`` if registered under ``plural``, else the registry's own unknown-name error (same words)."""
    known = names(plural)
    if isinstance(name, str) and name in known:
        return name
    raise UnknownNameError(unknown_name_message(read()[plural]["kind"], name, known))


def render(catalogue: dict[str, Any]) -> str:
    return json.dumps(catalogue, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite catalogue.json from the live registries")
    args = parser.parse_args(argv)
    text = render(build())
    if args.write:
        tmp = CATALOGUE_PATH.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(CATALOGUE_PATH)
        print(f"wrote {CATALOGUE_PATH}")
        return 0
    current = CATALOGUE_PATH.read_text() if CATALOGUE_PATH.exists() else ""
    if current != text:
        print(f"{CATALOGUE_PATH} is out of date: python -m equicore.catalogue --write", file=sys.stderr)
        return 1
    print("catalogue up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
