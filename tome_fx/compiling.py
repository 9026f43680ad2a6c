"""torch.compile for rewritten modules: one graph, static token counts, dynamic batch.

The rewritten GraphModule is plain torch code (no Python state, no data-dependent shapes), so
dynamo captures it as a single graph. Token counts after each merge are Python ints computed
from ``x.shape[1]``, which depends only on the input resolution, so they stay static. The batch
dimension follows torch's automatic dynamic shapes: the first call compiles for its batch size,
the first call with a different size recompiles once with a symbolic batch, and later sizes
reuse that graph. Mark the batch dimension up front (``torch._dynamo.mark_dynamic(x, 0)``) to
skip that one recompile.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .capture.export import input_check_hook

DEFAULTS = {"fullgraph": True}  # a graph break is an error, not a silent slow path


def compile_options(option: Any) -> dict | None:
    """``optimize``'s ``compile`` argument as torch.compile keyword arguments (None: no compile)."""
    if option is False or option is None:
        return None
    if option is True:
        return dict(DEFAULTS)
    if isinstance(option, dict):
        return {**DEFAULTS, **option}
    raise TypeError(f"compile must be True, False or a dict of torch.compile options, got {option!r}")


def compile_module(module: nn.Module, option: Any = True) -> nn.Module:
    """``torch.compile(module, fullgraph=True, **options)``; ``option``: True or a dict.
    Inputs of a shape an export-captured module does not take raise ``ShapeError`` before
    compiling (``export_capture.input_check_hook``)."""
    compiled = torch.compile(module, **compile_options(option))
    hook = input_check_hook(module) if isinstance(module, fx.GraphModule) else None
    if hook is not None:
        compiled.register_forward_pre_hook(hook, with_kwargs=True)
    return compiled


def finish_module(out: nn.Module, compile: Any, captured=None) -> nn.Module:
    """A rewritten module as ``optimize`` returns it: the example inputs it was captured with
    (``.tome_inputs``, export's default), the mode the model was given in, compiled if asked
    (``.tome`` and ``.tome_counts`` stay reachable)."""
    if captured is not None:
        out.tome_inputs = (captured.args, captured.kwargs)
        out.train(captured.training)
    if compile not in (False, None):
        out = compile_module(out, compile)
    return out
