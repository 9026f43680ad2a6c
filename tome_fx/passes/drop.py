"""Drop the tokens the output never reads, after the last attention.

A class-token model's head reads token 0 only. After the last attention, every other token's
query row, output projection and MLP row is work whose result is discarded. This pass copies
the last block's attention branch with its queries and its residual narrowed to the protected
prefix (``torch.narrow(stream, token_dim, 0, keep)``); keys and values still come from every
token. Everything downstream then runs on the kept tokens only.

The kept rows are computed from the same inputs as before, so the rewrite is exact where it
applies. ``check_drop`` verifies that by running the graph, and the caller keeps the drop only
if the check passes:

* structurally: every op that consumes the narrowed tokens is per-token, or reads a kept token
  by position (found by running with ``keep`` = prefix and prefix + 1, as the merge check does);
  a mean over tokens, an output that keeps the token dimension, or another attention is refused;
* numerically: the outputs with ``keep`` = prefix equal those with ``keep`` = all tokens (the
  unpruned function) on the example inputs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from .. import graph_utils as gu
from ..errors import one_line
from ..match import Block, Core
from .base import PassResult, finish, inserted
from .token_flow import Flow, _classify, _tdims

Node = fx.Node
NO_PREFIX = "no protected prefix token to keep: the output reads every token"


@dataclass(frozen=True)
class Drop:
    block: Block  # the last block, rewired to its copied attention branch
    keep: Node  # torch.narrow(stream_in, token_dim, 0, keep): the tokens kept
    copies: dict  # original node -> its copy, for the copies left in the graph


def _branch(block: Block) -> list[Node]:
    """Nodes on a path from the block's input stream to its attention residual add, in order."""
    start, end = block.stream_in, block.attn_add
    down, todo = set(), [start]
    while todo:
        for u in todo.pop().users:
            if u not in down:
                down.add(u)
                todo.append(u)
    up, todo = {end}, [end]
    while todo:
        for i in todo.pop().all_input_nodes:
            if i in down and i not in up:
                up.add(i)
                todo.append(i)
    return [n for n in start.graph.nodes if n in up]


def _value_args(core: Core) -> list[tuple[Node, int, str]]:
    """(node, arg position, kwarg name) of the core's key and value inputs, which the copy
    takes from the original (all tokens) rather than from the narrowed stream."""
    if core.kind == "sdpa":
        return [(core.anchor, 1, "key"), (core.anchor, 2, "value")]
    qk = next(n for n in core.nodes if gu.is_matmul(n) and n is not core.out)
    return [(qk, 1, "other"), (core.out, 1, "other")]


def drop_unread(gm: fx.GraphModule, block: Block, prefix: int) -> PassResult:
    """Narrow the last block's queries and residual to the first ``prefix`` tokens.

    ``info``: a ``Drop``, or None with the reason in ``notes`` when the block's layout is not
    one this pass handles (a padding mask, no protected prefix). Verify with ``check_drop``.
    """
    core = block.core
    if prefix < 1:
        return PassResult(gm, 0, None, [NO_PREFIX])
    if core.mask is not None:
        return PassResult(gm, 0, None, ["the last attention has a padding mask"])
    graph = gm.graph
    branch = _branch(block)
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


def _run(gm: fx.GraphModule, keep: Node, k: int, args, kwargs):
    keep.update_arg(3, k)
    gm.recompile()
    rec = gu.ShapeRecorder(gm)
    with torch.no_grad():
        out = gu.run_interpreter(rec, gm, args, kwargs)
    return rec.shapes, out


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


def check_drop(gm: fx.GraphModule, drop: Drop, prefix: int, args, kwargs) -> str | None:
    """None if the drop keeps the model's outputs, else why not (the graph is left at ``keep``
    = prefix; the caller discards it on a reason)."""
    keep = drop.keep
    try:
        shapes_b, _ = _run(gm, keep, prefix + 1, args, kwargs)
        shapes_a, out_a = _run(gm, keep, prefix, args, kwargs)
        tokens = shapes_a[drop.block.stream_in][drop.block.token_dim]
        _, out_full = _run(gm, keep, tokens, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure means the layout does not allow it
        return f"the graph does not run with the unread tokens dropped: {one_line(exc)}"
    finally:
        keep.update_arg(3, prefix)
        gm.recompile()
    tdims = {n: _tdims(shapes_a.get(n), shapes_b.get(n)) for n in gm.graph.nodes}
    core_nodes = drop.block.core.nodes
    flow, size_of, offset = Flow(), {}, {}
    for n in gm.graph.nodes:
        token_inputs = [i for i in n.all_input_nodes if tdims.get(i)]
        if not token_inputs or n is keep or n in core_nodes:
            continue
        if n.op == "output":
            return "the model's output keeps the token dimension"
        reason = _classify(gm, n, token_inputs[0], tdims, shapes_a, prefix, flow, size_of, offset)
        if reason or flow.pools:
            return reason or f"{n.name} pools over tokens"
    if not _same(out_full, out_a):
        return "the outputs change when the unread tokens are dropped"
    return None
