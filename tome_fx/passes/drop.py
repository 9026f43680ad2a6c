"""Drop the tokens the output never reads, after the last attention.

A class-token model's head reads token 0 only. After the last attention, every other token's
query row, output projection and MLP row is work whose result is discarded. This pass copies
the last block's attention branch with its queries and its residual narrowed to the protected
prefix (``torch.narrow(stream, token_dim, 0, keep)``); keys and values still come from every
token. Everything downstream then runs on the kept tokens only.

The kept rows are computed from the same inputs as before, so the rewrite is exact where it
applies. ``checks.drop.check_drop`` verifies that by running the graph, and the pipeline keeps
the drop only if the check passes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import graph as gu
from ..match import Block, Core
from .base import Context, PassResult, finish, inserted

Node = fx.Node
NO_PREFIX = "no protected prefix token to keep: the output reads every token"


@dataclass(frozen=True)
class Drop:
    block: Block  # the last block, rewired to its copied attention branch
    keep: Node  # torch.narrow(stream_in, token_dim, 0, keep): the tokens kept
    copies: dict  # original node -> its copy, for the copies left in the graph


def _value_args(core: Core) -> list[tuple[Node, int, str]]:
    """(node, arg position, kwarg name) of the core's key and value inputs, which the copy
    takes from the original (all tokens) rather than from the narrowed stream."""
    if core.kind == "sdpa":
        return [(core.anchor, 1, "key"), (core.anchor, 2, "value")]
    qk = next(n for n in core.nodes if gu.is_matmul(n) and n is not core.out)
    return [(qk, 1, "other"), (core.out, 1, "other")]


def drop_unread(ctx: Context) -> PassResult:
    """Narrow the last block's queries and residual to the protected prefix tokens.

    ``info``: a ``Drop``, or None with the reason in ``notes`` when the block's layout is not
    one this pass handles (a padding mask, no protected prefix). Verify with ``check_drop``.
    """
    gm, block, prefix = ctx.gm, ctx.matches.blocks[-1], ctx.matches.prefix
    core = block.core
    if prefix < 1:
        return PassResult(gm, 0, None, [NO_PREFIX])
    if core.mask is not None:
        return PassResult(gm, 0, None, ["the last attention has a padding mask"])
    graph = gm.graph
    branch = gu.between(block.stream_in, block.attn_add)  # the attention branch, in order
    env: dict[Node, Node] = {}
    with graph.inserting_before(block.attn_add):
        keep = inserted(graph.call_function(
            torch.narrow, (block.stream_in, block.token_dim, 0, prefix)), "keep", block=block.index)
        env[block.stream_in] = keep
        for n in branch:
            env[n] = graph.node_copy(n, lambda a: env.get(a, a))
    for n, pos, name in _value_args(core):
        gu.set_arg(env[n], pos, name, gu.arg(n, pos, name))
    new_add = env[block.attn_add]
    for u in list(block.attn_add.users):
        if u is not new_add:
            u.replace_input_with(block.attn_add, new_add)
    gone = set()
    for n in reversed(branch):  # the original branch, except what feeds the keys and values
        if not n.users:
            graph.erase_node(n)
            gone.add(n)
    for n in reversed(branch):  # copies of the key/value path: the original's are used instead
        if not env[n].users:
            graph.erase_node(env[n])
            gone.add(env[n])
    copies = {n: env[n] for n in branch if env[n] not in gone}
    new_core = dataclasses.replace(
        core, anchor=env[core.anchor], query=env.get(core.query, core.query),
        out=env[core.out], logits=env.get(core.logits, core.logits) if core.logits else None,
        nodes=frozenset(env[n] for n in core.nodes if n in env))
    merge_at = env.get(block.merge_at, block.merge_at)
    new_block = dataclasses.replace(block, core=new_core, attn_add=new_add, merge_at=merge_at)
    return PassResult(finish(gm), 1, Drop(new_block, keep, copies))
