"""Render docs/RESULTS.md from docs/RESULTS.template.md and the pages `equi report --all` wrote to docs/results/.

A line ``{{table PAGE | HEADING}}`` in the template is replaced by the table under ``### HEADING`` in
``docs/results/PAGE.md``, copied verbatim (with its notes), so every number in a RESULTS.md table comes from a
generated page; only the prose around the tables is written by hand. ``--check`` exits 1 when RESULTS.md is stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"^\{\{table (?P<page>[^|]+?) \| (?P<heading>.+?)\}\}$")


def section(page: Path, heading: str) -> str:
    """The block under ``### heading`` in a generated page, up to the next heading, as bold title + table."""
    lines = page.read_text().splitlines()
    try:
        start = lines.index(f"### {heading}")
    except ValueError:
        raise SystemExit(f"{page}: no '### {heading}' heading (re-run `equi report --all`?)") from None
    body = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        body.append(line)
    return "\n".join([f"**{heading}**", *body]).rstrip()


def render(template: Path, pages: Path) -> str:
    out = []
    for line in template.read_text().splitlines():
        m = PLACEHOLDER.match(line.strip())
        out.append(section(pages / f"{m['page'].strip()}.md", m["heading"].strip()) if m else line)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/RESULTS.md differs from a fresh render")
    args = parser.parse_args(argv)
    text = render(REPO / "docs" / "RESULTS.template.md", REPO / "docs" / "results")
    target = REPO / "docs" / "RESULTS.md"
    if args.check:
        if target.read_text() != text:
            print(f"{target} is stale: run python scripts/render_results.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
