"""Proportional attention: add log(size) over keys to every attention after a merge."""
from __future__ import annotations

import operator

import torch.fx as fx

from .. import graph as gu
from ..kernels.tokens import add_attn_bias, size_bias
from .base import Context, PassResult, finish, inserted


def _latest_size(order: dict, sites, anchor: fx.Node):
    before = [s for s in sites if order[s.size] < order[anchor]]
    return before[-1].size if before else None


def add_size_bias(ctx: Context) -> PassResult:
    """Every attention core after a merge gets ``log(size)`` of the latest merge's sizes: in
    SDPA's ``attn_mask`` (added to a mask already there), or added to explicit logits."""
    graph = ctx.gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for core in ctx.matches.cores:
        size = _latest_size(order, ctx.sites, core.anchor)
        if size is None:
            continue
        if core.kind == "sdpa":
            with graph.inserting_before(core.anchor):
                ndim = len(ctx.shapes[core.query])
                bias = inserted(graph.call_function(size_bias, (size, ndim, core.query)), "bias")
                mask = gu.arg(core.anchor, 3, "attn_mask")
                new = bias
                if mask is not None:
                    new = inserted(graph.call_function(add_attn_bias, (mask, bias)), "bias")
            gu.set_arg(core.anchor, 3, "attn_mask", new)  # where the mask was passed
        else:
            logits = core.logits
            with graph.inserting_before(core.anchor):
                ndim = len(ctx.shapes[logits])
                bias = inserted(graph.call_function(size_bias, (size, ndim, logits)), "bias")
                biased = inserted(graph.call_function(operator.add, (logits, bias)), "bias")
            core.anchor.replace_input_with(logits, biased)
        count += 1
    return PassResult(finish(ctx.gm), count)
