"""The package's shape (ARCHITECTURE.md): imports point only down the declared layers, with no
cycle, function-level imports included; modules stay small; no code is written twice."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tome_fx")

# Lowest first. A module may import from its own layer and the layers before it.
LAYERS = [
    ("errors", "plans", "schedule"),  # plain data and errors
    ("graph",),  # reading and running fx graphs
    ("capture",),  # fx tracing, torch.export, example inputs
    ("match",),  # attention cores -> blocks | refusals
    ("kernels",),  # tensor functions the rewritten graph calls
    ("passes",),  # graph transforms
    ("checks",),  # analyses that return reasons
    ("pipeline",),  # the one fix-point rewrite
    ("methods",),  # ToMe, ToMato: a kernel and an insertion rule each
    ("cost",),  # FLOP model, schedule search, calibration
    ("compiling", "track", "export_files", "exporting"),  # compile, token sources, ONNX/.pt2
    ("timing", "data", "diffusion", "distributed", "todo_front"),  # throughput, bars; real inputs;
    # diffusers models; the processes torchrun starts
    ("api",),  # optimize / explain / plan / compile
    ("results", "sweep"),  # accuracy vs compute on real data; its table, JSON and plot
    ("cli",),  # tome-fx
    ("__init__", "__main__"),  # the package's front door
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 400


def _modules() -> dict[str, str]:
    """Dotted module name (``tome_fx.graph.run``) -> file path."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__" and len(rel) > 1:
                    rel = rel[:-1]
                out[".".join(["tome_fx", *rel])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, "").endswith("__init__.py")


def _imports(name: str) -> set[str]:
    """Package modules ``name`` imports, anywhere in the file (functions included)."""
    tree = ast.parse(open(MODULES[name]).read())
    base = name.split(".") if _is_package(name) else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = ".".join(base[:len(base) - node.level + 1])
                mod = f"{parent}.{node.module}" if node.module else parent
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == "tome_fx" or t.startswith("tome_fx.")}
    return found - {name}


def _layer(name: str) -> int:
    parts = name.split(".")
    return LAYER["__init__" if len(parts) == 1 else parts[1]]


def test_every_module_has_a_layer():
    unknown = sorted({m.split(".")[1] for m in MODULES if "." in m} - set(LAYER))
    assert not unknown, f"add these to LAYERS (and ARCHITECTURE.md): {unknown}"


def test_imports_point_down_the_layers():
    upward = [f"{m} imports {t}" for m in MODULES for t in _imports(m) if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = {m: _imports(m) for m in MODULES}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_checker_sees_function_level_and_upward_imports(tmp_path, monkeypatch):
    """The checks above can fail: an upward import inside a function is found."""
    fake = tmp_path / "graph_fake.py"
    fake.write_text("def f():\n    from ..api import optimize\n")
    monkeypatch.setitem(MODULES, "tome_fx.graph.fake", str(fake))
    assert "tome_fx.api" in _imports("tome_fx.graph.fake")
    assert _layer("tome_fx.api") > _layer("tome_fx.graph.fake")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small(name):
    lines = sum(1 for _ in open(MODULES[name]))
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (at most {MAX_LINES})"


def _code_lines(path: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that are code: not blank, comments, imports,
    docstring text or lone brackets."""
    out, doc = [], False
    for i, line in enumerate(open(path), 1):
        text = line.split("#")[0].strip() if not doc else line.strip()
        quotes = text.count('"""')
        if doc or text.startswith('"""'):
            doc = doc != (quotes % 2 == 1)
            continue
        if not text or text.startswith(("import ", "from ")) or set(text) <= set("()[]{},:"):
            continue
        out.append((i, " ".join(text.split())))
    return out


def test_no_six_lines_written_twice():
    """No run of six identical code lines in two places of the package."""
    seen, repeated = {}, []
    for name, path in sorted(MODULES.items()):
        lines = _code_lines(path)
        for k in range(len(lines) - 5):
            window = tuple(t for _, t in lines[k:k + 6])
            where = (os.path.relpath(path, ROOT), lines[k][0])
            first = seen.setdefault(window, where)
            if first != where:
                repeated.append(f"{where[0]}:{where[1]} repeats {first[0]}:{first[1]}")
    assert not repeated, "\n".join(repeated)
