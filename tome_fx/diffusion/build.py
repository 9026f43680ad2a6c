"""The ToMeSD module of a diffusers model for one call signature: what ``optimize`` builds
first and what a ``DiffusionModule`` builds again for a call its graphs do not take."""
from __future__ import annotations

import warnings

import torch.nn as nn

from ..capture import capture
from ..compiling import finish_module
from ..cost.tomesd import rewrite_tomesd


def build_tomesd(found, flops_budget, compile, model: nn.Module, inputs: dict) -> nn.Module:
    """The ToMeSD module of ``model`` for keyword ``inputs``, the latent's height and width
    dynamic where export allows (``capture(image_sizes=True)``). After the first build
    (``found.ratio`` then a dict of the levels chosen), inputs where nothing can merge (a grid
    smaller than a window, blocks a changed model no longer shows) run the unmerged capture,
    with a warning; the first build raises."""
    captured = capture(model, inputs, image_sizes=True)
    try:
        result = rewrite_tomesd(captured, found, flops_budget)
    except ValueError as exc:
        if flops_budget is not None or not isinstance(found.ratio, dict):
            raise
        warnings.warn(f"{exc}; these inputs run unmerged", UserWarning, stacklevel=5)
        out = captured.graph_module
        out.tome, out.tome_counts = None, {}
        return finish_module(out, compile, captured)
    out = result.graph_module
    out.tome_counts = result.counts
    return finish_module(out, compile, captured)
