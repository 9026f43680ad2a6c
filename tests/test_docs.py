"""The documentation: the strict mkdocs build CI runs, the references generated from the code,
the guides' quick examples run, the README's length and CI lines, the suite's counts."""
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tome_fx
from tome_fx.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from docs_hooks import subcommands  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    return run, out


def test_mkdocs_build_strict(site):
    run, _ = site
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_api_reference_has_every_public_name(site):
    run, out = site
    assert run.returncode == 0
    page = (out / "reference" / "api" / "index.html").read_text()
    missing = [n for n in tome_fx.__all__ if f'id="tome_fx.{n}"' not in page]
    assert not missing, f"not in docs/reference/api.md: {missing}"


def test_cli_reference_has_every_subcommand_help(site):
    run, out = site
    assert run.returncode == 0
    page = (out / "reference" / "cli" / "index.html").read_text()
    names = list(subcommands(build_parser()))
    assert {"report", "bench", "sweep", "visualize", "export"} <= set(names)
    for name in names:
        assert f"usage: tome-fx {name} [-h]" in page, name
        assert f'id="tome-fx-{name}"' in page, name


def test_results_page_includes_results_md_and_its_files(site):
    run, out = site
    assert run.returncode == 0
    first = (ROOT / "benchmarks" / "RESULTS.md").read_text().splitlines()[0].lstrip("# ")
    assert first in (out / "results" / "index.html").read_text()
    files = {p.name for p in (ROOT / "benchmarks" / "results").iterdir() if p.suffix != ".md"}
    assert files and files <= {p.name for p in (out / "results").iterdir()}


def _classifier_reference(ns):
    return ns["model"](ns["x"])


def _text_reference(ns):
    return ns["model"](input_ids=ns["ids"], attention_mask=ns["mask"]).logits


@pytest.mark.floor_default  # the examples run as a user runs them
@pytest.mark.parametrize("name, guide, reference", [("classifier", "vision", _classifier_reference),
                                                    ("text", "text", _text_reference)])
def test_guide_quick_example_runs(name, guide, reference, capsys):
    guide_text = (ROOT / "docs" / "guides" / f"{guide}.md").read_text()
    assert f'--8<-- "examples/docs/{name}.py"' in guide_text  # the guide shows this file
    ns = runpy.run_path(str(ROOT / "examples" / "docs" / f"{name}.py"), run_name="__main__")
    plan = ns["fast"].tome
    assert 0.49 <= plan.ratio <= 0.5  # flops_budget=0.5 met
    assert str(plan) in capsys.readouterr().out
    with torch.no_grad():
        expected = reference(ns)
    assert ns["logits"].shape == expected.shape and torch.isfinite(ns["logits"]).all()


@pytest.mark.slow  # a UNet captured by torch.export: about 30 s on a shared CPU
def test_diffusion_guide_quick_example_runs(capsys):
    assert '--8<-- "examples/docs/diffusion.py"' in (ROOT / "docs" / "guides" / "diffusion.md").read_text()
    ns = runpy.run_path(str(ROOT / "examples" / "docs" / "diffusion.py"), run_name="__main__")
    plan = ns["fast"].tome
    assert any(row.r > 0 for row in plan.blocks) and plan.ratio < 1
    assert str(plan) in capsys.readouterr().out
    assert ns["noise"].shape == ns["latents"].shape and torch.isfinite(ns["noise"]).all()


def test_readme_is_short_and_keeps_the_ci_lines():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    lines = text.splitlines()
    assert next(l for l in lines if re.match(r"^pip install ", l)) == 'pip install -e ".[dev]"'
    assert next(l for l in lines if re.match(r"^python -m pytest", l)) == "python -m pytest -q"
    # the README's classifier example is the guide's, which the test above runs
    assert (ROOT / "examples" / "docs" / "classifier.py").read_text().strip() in text


def test_suite_counts_match_collection():
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "suite_numbers.py"), "--check"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
