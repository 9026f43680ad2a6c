"""ToDo's rewrite, its FLOPs and the budget search.

ToDo keeps every query, so a self-attention's FLOPs are linear in its kept key count ``K``
(``QK^T`` and ``AV``: ``2*B*heads*N*K*(d_qk + d_v)``; the key and value projections
``2*B*K*C*(d_k + d_v)``), and the model's FLOPs are the original's plus, per reduced site,
``slope * (K - N)``. The slope of each site is measured: one run of the graph with every
site reduced, node by node (``run_flops``), the nodes between the reduction and the attention.
"""
from __future__ import annotations

import dataclasses

from ..capture import Captured
from ..methods.todo import ToDo, kv_counts
from ..pipeline import Rewrite, rewrite


def rewrite_todo(captured: Captured, method: ToDo) -> Rewrite:
    """The ToDo rewrite of ``captured`` in ``method``'s branch; ``counts["kv_reduce"]``: the
    self-attentions whose keys and values are reduced."""
    rw = rewrite(captured, method, prop_attn=False, drop=False)
    n = sum(1 for x in rw.graph_module.graph.nodes
            if x.meta.get("tome", {}).get("role") == "kv_reduce"
            and x.meta["tome"].get("site") is not None)
    rw.counts["kv_reduce"] = len({x.meta["tome"]["site"] for x in rw.graph_module.graph.nodes
                                  if x.meta.get("tome", {}).get("role") == "kv_reduce"})
    rw.counts["kv_calls"] = n
    rw.graph_module.tome = rw.plan
    return rw
