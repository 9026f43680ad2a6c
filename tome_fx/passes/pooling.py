"""Size-weighted pooling: a mean (sum) over merged tokens becomes a mean (sum) weighted by
token size: a merged token is the mean of its sources, so size * token = sum of the sources."""
from __future__ import annotations

import operator

from ..kernels.tokens import weighted_mean, weighted_sum
from .base import Context, PassResult, finish, inserted


def weight_pooling(ctx: Context, pools) -> PassResult:
    """Replace each ``pools`` entry (``checks.token_flow.Pool``) by its size-weighted form."""
    graph = ctx.gm.graph
    for pool in pools:
        n = pool.node
        x = n.args[0]
        keepdim = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
        with graph.inserting_before(n):
            size = pool.size
            if pool.offset:
                index = (slice(None), slice(pool.offset, None))
                size = inserted(graph.call_function(operator.getitem, (size, index)), "size")
            fn = weighted_sum if pool.kind == "sum" else weighted_mean
            new = inserted(graph.call_function(fn, (x, size, pool.dim, keepdim)), "pool")
        n.replace_all_uses_with(new)
        graph.erase_node(n)
    return PassResult(finish(ctx.gm), len(pools))
