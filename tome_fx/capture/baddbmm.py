"""``baddbmm`` logits as a product the matcher reads.

diffusers' classic ``AttnProcessor`` (and HF models such as Bloom) compute attention logits as
``baddbmm(input, q, k^T, beta=b, alpha=a)`` = ``b * input + a * (q @ k^T)``: with ``beta=0`` the
input is an empty tensor that only sets the shape, with ``beta=1`` it is the mask. Rewritten to
``bmm(q, k^T) * a`` (``+ input``), the same values, the attention core is the softmax between
two products that ``match`` finds; other betas are left as they are.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import graph as gu

_BADDBMM = {torch.baddbmm, torch.Tensor.baddbmm, torch.ops.aten.baddbmm}


def split_baddbmm(gm: fx.GraphModule) -> int:
    """Rewrite every ``baddbmm`` with ``beta`` 0 or 1; returns how many were rewritten."""
    graph, count = gm.graph, 0
    for n in list(graph.nodes):
        if not gu.is_call(n, _BADDBMM, ("baddbmm",)):
            continue
        beta, alpha = gu.arg(n, 3, "beta", 1), gu.arg(n, 4, "alpha", 1)
        if beta not in (0, 1) or not isinstance(alpha, (int, float)):
            continue
        base, a, b = n.args[:3]
        aten = isinstance(n.target, torch._ops.OpOverload)
        with graph.inserting_before(n):
            out = graph.call_function(torch.ops.aten.bmm.default if aten else torch.bmm, (a, b))
            if alpha != 1:
                out = graph.call_function(torch.ops.aten.mul.Tensor if aten else torch.mul,
                                          (out, alpha))
            if beta == 1:
                out = graph.call_function(torch.ops.aten.add.Tensor if aten else torch.add,
                                          (out, base))
        out.meta.update({k: v for k, v in n.meta.items() if k in ("nn_module_stack", "val")})
        n.replace_all_uses_with(out)
        graph.erase_node(n)
        count += 1
    if count:
        graph.eliminate_dead_code()
        gm.recompile()
    return count
