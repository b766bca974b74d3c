"""Render docs/RESULTS.md and docs/TUNING.md from their templates and the generated pages.

docs/RESULTS.md quotes the pages `equi report --all` wrote to docs/results/ (the paper's experiments, one run each);
docs/TUNING.md quotes docs/tuning/ (issue #19's searches and their test runs, from scripts/tune_results_pages.sh).
A line ``{{table PAGE | HEADING}}`` in a template is replaced by the table under ``### HEADING`` in
``PAGES/PAGE.md``, copied verbatim (with its notes), so every number in a table comes from a generated page; only
the prose around the tables is written by hand. ``--check`` exits 1 when either document is stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (document name, folder of the pages its template quotes), both under docs/
DOCUMENTS = (("RESULTS", "results"), ("TUNING", "tuning"))
PLACEHOLDER = re.compile(r"^\{\{table (?P<page>[^|]+?) \| (?P<heading>.+?)\}\}$")


IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)/:]+)\)")


def section(page: Path, heading: str) -> str:
    """The block under ``### heading`` in a generated page, up to the next heading, as bold title + table; images
    it shows keep pointing at the page's folder."""
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
    text = "\n".join([f"**{heading}**", *body]).rstrip()
    return IMAGE.sub(lambda m: f"![{m['alt']}]({page.parent.name}/{m['src']})", text)


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
    stale = 0
    for name, pages in DOCUMENTS:
        text = render(REPO / "docs" / f"{name}.template.md", REPO / "docs" / pages)
        target = REPO / "docs" / f"{name}.md"
        if not args.check:
            target.write_text(text)
            print(target)
        elif target.read_text() != text:
            print(f"{target} is stale: run python scripts/render_results.py", file=sys.stderr)
            stale = 1
    return stale


if __name__ == "__main__":
    sys.exit(main())
