"""A model tome_fx has merged already: a module ``optimize`` returned (its graph calls
tome_fx's kernels), or a ``.pt2`` ``tome_fx.export`` wrote (ATen ops only, but every op traced
from a kernel call keeps that call in its ``stack_trace``, which the archive stores). Merging
it again would read the merged graph as a model: its merges as ops of the model, its size bias
as a padding mask. ``capture`` refuses it with ``MergedError``."""
from __future__ import annotations

import re

import torch.fx as fx

from ..errors import MergedError

# the line of the rewritten module's generated code that a traced op came from:
# ``tome_merge = tome_fx_kernels_tome_tome_merge(x, ...)``
_KERNEL_CALL = re.compile(r"(\w+?)(?:_\d+)? = tome_fx_kernels_\w+\(")


def _graphs(model):
    if isinstance(getattr(model, "graph_module", None), fx.GraphModule):  # an ExportedProgram
        model = model.graph_module
    modules = model.modules() if hasattr(model, "modules") else ()
    return [m.graph for m in modules if isinstance(getattr(m, "graph", None), fx.Graph)]


def merge_evidence(model) -> str | None:
    """What shows that ``model`` (a module or an ExportedProgram) computes tome_fx's merges:
    a kernel it calls, or one its exported ops were traced from; None if nothing does."""
    for graph in _graphs(model):
        for n in graph.nodes:
            where = getattr(n.target, "__module__", None) or ""
            if n.op == "call_function" and where.startswith("tome_fx.kernels"):
                return f"its graph calls {where}.{getattr(n.target, '__name__', n.target)}"
            found = _KERNEL_CALL.search(n.meta.get("stack_trace") or "")
            if found:
                return f"its ops were traced from tome_fx's {found.group(1)}"
    return None


def refuse_merged(model, name: str | None = None) -> None:
    """``MergedError`` (one line) if ``model`` is already merged by tome_fx; ``name``: what
    to call it (a file name), default its class."""
    why = merge_evidence(model)
    if why is None:
        return
    what = name or type(model).__name__
    raise MergedError(f"{what} is already merged by tome_fx ({why}): optimize the original "
                      "model instead (the one optimize or tome-fx export was given)")
