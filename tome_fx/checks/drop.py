"""Check a drop of unread tokens (``passes.drop``) by running the graph.

* structurally: every op that consumes the narrowed tokens is per-token, or reads a kept token
  by position (found by running with ``keep`` = prefix and prefix + 1, as the merge check does);
  a mean over tokens, an output that keeps the token dimension, or another attention is refused;
* numerically: the outputs with ``keep`` = prefix equal those with ``keep`` = all tokens (the
  unpruned function) on the example inputs.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from .. import graph as gu
from ..errors import one_line
from ..passes.base import Context
from ..passes.drop import Drop
from .token_flow import Flow, classify

Node = fx.Node


def _run(ctx: Context, keep: Node, k: int):
    """Shapes and outputs with ``k`` tokens kept."""
    with gu.overriding(ctx.gm, {keep: {3: k}}):
        return gu.record_shapes(ctx.gm, ctx.args, ctx.kwargs)


def _same(a, b) -> bool:
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not isinstance(x, torch.Tensor):
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            scale = float(x.abs().max()) if x.numel() else 0.0
            if not torch.allclose(x, y, rtol=1e-4, atol=1e-5 * max(scale, 1e-6)):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def check_drop(ctx: Context, drop: Drop) -> str | None:
    """None if the drop keeps the model's outputs, else why not."""
    gm, keep, prefix = ctx.gm, drop.keep, ctx.matches.prefix
    try:
        shapes_b, _ = _run(ctx, keep, prefix + 1)
        shapes_a, out_a = _run(ctx, keep, prefix)
        tokens = shapes_a[drop.block.stream_in][drop.block.token_dim]
        _, out_full = _run(ctx, keep, tokens)
    except Exception as exc:  # noqa: BLE001 - any failure means the layout does not allow it
        return f"the graph does not run with the unread tokens dropped: {one_line(exc)}"
    tdims = {n: gu.token_dims(shapes_a.get(n), shapes_b.get(n)) for n in gm.graph.nodes}
    core_nodes = drop.block.core.nodes
    flow, size_of, offset = Flow(), {}, {}
    for n in gm.graph.nodes:
        token_inputs = [i for i in n.all_input_nodes if tdims.get(i)]
        if not token_inputs or n is keep or n in core_nodes:
            continue
        if n.op == "output":
            return "the model's output keeps the token dimension"
        if any(n in c.nodes for c in ctx.matches.cores):  # attention pooling after the blocks
            return f"attention {n.name} after the last block reads the tokens past the prefix"
        reason = classify(gm, n, token_inputs[0], tdims, shapes_a, prefix, flow, size_of, offset)
        if reason or flow.pools:
            return reason or f"{n.name} pools over tokens"
    if not _same(out_full, out_a):
        return "the outputs change when the unread tokens are dropped"
    return None
