"""mkdocs hooks (``hooks:`` in mkdocs.yml): pages generated from the code at build time.

- ``<!-- cli-help -->`` in a page becomes the ``--help`` of ``tome-fx`` and of each subcommand,
  read from the argparse parser, so the CLI reference cannot drift from the code.
- ``benchmarks/results/*`` are added to the site under ``results/``, so the results page, which
  includes ``benchmarks/RESULTS.md``, finds the files RESULTS.md links relative to itself
  (``results/x.png``) without a copy committed under ``docs/``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = "<!-- cli-help -->"


def subcommands(parser: argparse.ArgumentParser) -> dict:
    """The subcommand parsers of ``parser`` by name (argparse keeps them in a private action)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def cli_help() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tome_fx.cli import build_parser

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fix it so the page is stable
    try:
        parser = build_parser()
        parts = ["## tome-fx", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in subcommands(parser).items():
            parts += [f"## tome-fx {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_help())
    return markdown


def on_files(files, config):
    for path in sorted(RESULTS.iterdir()):
        if not path.is_file():
            continue
        file = File.generated(config, f"results/{path.name}", abs_src_path=str(path))
        if file.is_documentation_page():  # the .md tables: reachable by link, not in the nav
            file.inclusion = InclusionLevel.NOT_IN_NAV
        files.append(file)
    return files
