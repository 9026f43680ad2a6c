"""Unmerge: merged tokens go back to the original token layout where the graph needs it.

Each ToMe merge can also return where each of its input tokens went (``kernels.tome.
plan_where``); ``tome_unmerge`` composes the maps of the merges upstream of a tensor and
copies every merged token back to each original position it stands for (ToMeSD). Protected
prefix tokens keep their own positions. The pipeline chooses the places (``Edge``): graph
outputs that keep a token dimension, and layout ops that fold the token dimension into a grid;
position-dependent attention is refused before this, never hidden by it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from .. import graph as gu
from ..kernels.tome import tome_merge, tome_unmerge
from .base import Context, PassResult, finish, inserted

MODES = ("auto", "outputs", False)


@dataclass(frozen=True)
class Edge:
    """Unmerge ``src`` where ``consumer`` reads it. Names, not nodes: every pipeline round
    rewrites a fresh copy of one capture, where the names are the same."""

    consumer: str
    src: str
    dim: int  # token dimension of ``src``
    offset: int  # ``src`` holds the tokens from this position on
    why: str


def check_mode(unmerge) -> None:
    if unmerge not in MODES:
        raise ValueError(f"unmerge must be 'auto', 'outputs' or False, got {unmerge!r}")


def in_tail(ctx: Context, node: fx.Node) -> bool:
    """Whether ``node`` comes after the last block's MLP residual (a head, a decoder, a neck):
    only there may a grid fold be unmerged, never inside the blocks (spatial-reduction
    attention folds tokens into a grid to make its keys, and merged queries must not meet them)."""
    blocks = ctx.matches.blocks
    if not blocks:
        return False
    order = {n: i for i, n in enumerate(ctx.gm.graph.nodes)}
    return order.get(node, -1) > order.get(blocks[-1].mlp_add, len(order))


def _fits(ctx: Context, src: fx.Node, edge: "Edge") -> bool:
    """Whether ``src`` (before merging) holds the first merge's tokens from ``edge.offset`` on
    along ``edge.dim``, with the batch next to it: the layout ``tome_unmerge`` rebuilds."""
    block = ctx.matches.blocks[ctx.sites[0].block]
    shape, first = ctx.shapes.get(src), ctx.shapes.get(block.merge_at)
    if not (gu.is_tensor_shape(shape) and gu.is_tensor_shape(first)) or len(shape) < 2:
        return False
    tokens, batch = first[block.token_dim], first[1 - block.token_dim]
    bdim = 1 if edge.dim == 0 else 0  # batch first, or sequence-first [N, B, ...]
    return (len(shape) > max(edge.dim, bdim + 1) and shape[edge.dim] == tokens - edge.offset
            and shape[bdim] == batch)


def _where(graph: fx.Graph, merge: fx.Node) -> fx.Node:
    """The merge's ``plan_where`` output (asked for once)."""
    found = next((u for u in merge.users if u.meta.get("tome", {}).get("role") == "where"), None)
    if found is not None:
        return found
    gu.set_merge_arg(merge, "where", True)
    with graph.inserting_after(merge):
        return inserted(graph.call_function(operator.getitem, (merge, -1)), "where")


def insert_unmerges(ctx: Context, edges) -> PassResult:
    """A ``tome_unmerge`` on each edge's ``src`` for its ``consumer``; count = inserted.
    ``info``: the edges done. An edge with no merge upstream, or one that is not ToMe's (ToMato
    keeps no map), is left as it is."""
    gm, done = ctx.gm, []
    if not ctx.sites:
        return PassResult(gm, 0, done)
    nodes = {n.name: n for n in gm.graph.nodes}
    for edge in edges:
        consumer, src = nodes.get(edge.consumer), nodes.get(edge.src)
        if (consumer is None or src is None or src not in consumer.all_input_nodes
                or not _fits(ctx, src, edge)):
            continue
        upstream = gu.ancestors_within(src, len(nodes))
        merges = [s.merge for s in ctx.sites if s.merge in upstream]
        if not merges or any(m.target is not tome_merge for m in merges):
            continue
        wheres = [_where(gm.graph, m) for m in merges]
        with gm.graph.inserting_before(consumer):
            node = gm.graph.call_function(tome_unmerge, (src, edge.dim, edge.offset, *wheres))
        consumer.replace_input_with(src, inserted(node, "unmerge", why=edge.why))
        done.append(edge)
    return PassResult(finish(gm), len(done), done)


def new_edges(ctx: Context, mode, flow, known: dict) -> dict:
    """Edges to add this round (keyed by (consumer, src)) from the token-flow check's exits:
    outputs for ``"outputs"`` and ``"auto"``, grid folds after the blocks (``in_tail``) too for
    ``"auto"``."""
    if not mode:
        return {}
    found = [e for e in flow.exits
             if e.consumer.op == "output" or (mode == "auto" and in_tail(ctx, e.consumer))]
    if any(gu.merge_arg(s.merge, "pad") is not None for s in ctx.sites
           if gu.takes_arg(s.merge, "pad")):
        # a left-padded sample's protected prefix is its first real tokens, not slot 0: a head
        # reading by position (a pooler's h[:, 0]) reads the original layout
        found += [e for e in flow.index_reads if in_tail(ctx, e.consumer)]
    edges = [Edge(e.consumer.name, e.src.name, e.dim, e.offset, e.why) for e in found]
    return {(e.consumer, e.src): e for e in edges if (e.consumer, e.src) not in known}
