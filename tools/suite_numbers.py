"""The test counts in docs/suite.md, from what pytest collects: the one place they are written.

    python tools/suite_numbers.py           # rewrite the counts in docs/suite.md
    python tools/suite_numbers.py --check   # exit 1 if they differ from the collection

tests/test_docs.py runs the check, so a change that adds tests fails until the page is updated.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "suite.md"
START, END = "<!-- suite-counts -->", "<!-- /suite-counts -->"
# "770/821 tests collected (51 deselected) in 4.3s" (slow tests deselected), or "821 tests collected"
LINE = re.compile(r"(?:(\d+)/)?(\d+) tests? collected")


def collect() -> tuple[int, int]:
    """(tests in the default run, tests only ``-m slow`` runs), from one collection."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True)
    found = LINE.search(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else None
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"pytest --collect-only failed (exit {out.returncode}):\n{out.stdout[-2000:]}"
                           f"{out.stderr[-2000:]}")
    selected, total = found.group(1), int(found.group(2))
    default = int(selected) if selected is not None else total
    return default, total - default


def render(default: int, slow: int) -> str:
    return (f"{START}\nThe default run (CI's, `python -m pytest -q`) has **{default} tests**; "
            f"`python -m pytest -q -m slow` runs the **{slow} tests** marked `slow`.\n{END}")


def read(text: str) -> tuple[int, ...]:
    """The counts written between the markers (an empty tuple before the first run)."""
    block = text[text.index(START):text.index(END)]
    return tuple(int(n) for n in re.findall(r"\*\*(\d+) tests\*\*", block))


def main(argv=None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    check = args.parse_args(argv).check
    text = PAGE.read_text()
    counted = collect()
    if check:
        written = read(text)
        if written != counted:
            print(f"docs/suite.md says {written}, pytest collects {counted}: run python "
                  f"tools/suite_numbers.py (counts are of the dev install: a test module skipped "
                  f"at collection for a missing package lowers them)", file=sys.stderr)
            return 1
        return 0
    old = text[text.index(START):text.index(END) + len(END)]
    PAGE.write_text(text.replace(old, render(*counted)))
    print(f"docs/suite.md: {counted[0]} default, {counted[1]} slow")
    return 0


if __name__ == "__main__":
    sys.exit(main())
