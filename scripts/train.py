#!/usr/bin/env python
"""Train one of the project's models (a recipe in ``training.RECIPES``) on the built-in data.

Usage:
  python scripts/train.py NAME [--out DIR] [--epochs N] [--seed S] [--limit N] [--eval-limit N] [--threads T]
  python scripts/train.py NAME --evaluate [--checkpoint PATH] [--eval-limit N]   (clean test metric only)
  python scripts/train.py --render-cards                                         (rewrite weights/MODEL_CARDS.md)
  python scripts/train.py --list

Without ``--out`` the checkpoint and its card go to equicore/models/weights/ and MODEL_CARDS.md is re-rendered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training  # noqa: E402
from equicore.errors import EquirobustError  # noqa: E402
from training.cards import recipes_in_card_order  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help=f"recipe: {', '.join(r.name for r in recipes_in_card_order())}")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default equicore/models/weights)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    parser.add_argument("--eval-limit", type=int, default=None, help="score the first N test images only")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--evaluate", action="store_true", help="only measure the clean test metric")
    parser.add_argument("--checkpoint", type=Path, default=None, help="with --evaluate: the checkpoint to score")
    parser.add_argument("--render-cards", action="store_true", help="rewrite MODEL_CARDS.md from the JSON cards")
    parser.add_argument("--list", action="store_true", help="list the recipes")
    args = parser.parse_args(argv)
    try:
        if args.list:
            for r in recipes_in_card_order():
                print(f"{r.name}: model {r.model}, {r.dataset} {r.train_split} -> {r.test_split}, {r.epochs} epochs")
            return 0
        if args.render_cards:
            print(training.write_model_cards(args.out))
            return 0
        if not args.name:
            parser.error("NAME is required (or --list / --render-cards)")
        if args.evaluate:
            import torch

            torch.set_num_threads(args.threads)
            res = training.evaluate_clean(args.name, args.checkpoint, limit=args.eval_limit, log=print)
            print(json.dumps(res, indent=2))
            return 0
        card = training.train(
            args.name,
            args.out,
            epochs=args.epochs,
            seed=args.seed,
            limit=args.limit,
            eval_limit=args.eval_limit,
            threads=args.threads,
        )
    except EquirobustError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    m = card["clean_test_metric"]
    print(f"{card['name']}: clean {m['metric']} {m['value']:.4f} on the {m['split']} split (n={m['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
