"""Size-weighted pooling: a mean over merged tokens becomes a mean weighted by token size."""
from __future__ import annotations

import operator

import torch.fx as fx

from .. import ops
from .base import PassResult, finish, inserted


def weight_pooling(gm: fx.GraphModule, pools) -> PassResult:
    graph = gm.graph
    for pool in pools:
        n = pool.node
        x = n.args[0]
        keepdim = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
        with graph.inserting_before(n):
            size = pool.size
            if pool.offset:
                index = (slice(None), slice(pool.offset, None))
                size = inserted(graph.call_function(operator.getitem, (size, index)), "size")
            new = inserted(
                graph.call_function(ops.weighted_mean, (x, size, pool.dim, keepdim)), "pool"
            )
        n.replace_all_uses_with(new)
        graph.erase_node(n)
    return PassResult(finish(gm), len(pools))
