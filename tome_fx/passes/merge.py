"""Splice a merge call into a block's merge point (between its attention residual and MLP).

The insertion rules (``tome_fx.rules``) decide where and with which kernel; this is the one place
that rewires the graph around a merge, whichever the kernel.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from ..match import Block
from .base import inserted


@dataclass(frozen=True)
class MergeSite:
    block: int
    merge: fx.Node  # the merge call (role "merge", see graph.merges)
    x: fx.Node  # merged tokens
    size: fx.Node  # token sizes after the merge


def splice_merge(graph: fx.Graph, block: Block, fn, args_of, **meta) -> MergeSite:
    """Call ``fn(*args_of(x))`` -> (merged x, size) on the tokens at ``block.merge_at`` (moved
    to [B, N, C] and back if sequence-first) and route every use of the merge point to it."""
    s = block.merge_at
    old_users = list(s.users)
    with graph.inserting_after(s):
        x = s
        if block.token_dim != 1:
            x = inserted(graph.call_method("transpose", (s, 0, 1)), "layout")
    with graph.inserting_after(x):
        call = inserted(graph.call_function(fn, args_of(x)), "merge", block=block.index, **meta)
    with graph.inserting_after(call):
        new_x = inserted(graph.call_function(operator.getitem, (call, 0)), "merged_x")
    with graph.inserting_after(new_x):
        new_size = inserted(graph.call_function(operator.getitem, (call, 1)), "size")
    out = new_x
    if block.token_dim != 1:
        with graph.inserting_after(new_size):
            out = inserted(graph.call_method("transpose", (new_x, 0, 1)), "layout")
    for u in old_users:
        u.replace_input_with(s, out)
    return MergeSite(block.index, call, out, new_size)
