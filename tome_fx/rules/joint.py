"""Where ToMeSD's merged tokens meet the rest of a joint-attention block: the split of the
joint output at the image token count (export bakes it), and per-token position tables (rotary
embedding) multiplied into the queries and keys.

A table is retargeted only where each token's position is known as the model's input (Flux's
``img_ids``): a merged token keeps its destination's position (``kernels.tomesd.tomesd_table``),
as its features are the destination's with its sources averaged in. Elsewhere (HunyuanDiT,
Lumina) the table is refused with its reason.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import graph as gu
from ..kernels.tomesd import tomesd_table
from ..passes.base import inserted
from .local import LocalBlock, values_of

Node = fx.Node


def _count(graph, x: Node) -> Node:
    with graph.inserting_after(x):
        return inserted(graph.call_function(torch.ops.aten.sym_size.int, (x, 1)), "shape")


def position_tables(b: LocalBlock, shapes) -> list[tuple[Node, Node]]:
    """(product, table) pairs in the op: a factor that does not come from the tokens and has
    one row per token of the attention's sequence at the tokens' dimension, broadcast over the
    batch (a rotary cos or sin table)."""
    inside = set(gu.between(b.merge_at, b.op_out))
    seq = shapes.get(b.core.query)
    if not gu.is_tensor_shape(seq) or len(seq) < 2:
        return []
    seq, found = seq[-2], []
    for u in inside:
        if gu.packet(u) is not torch.ops.aten.mul:
            continue
        ours = [a for a in u.args[:2] if isinstance(a, Node) and (a in inside or a is b.merge_at)]
        for t in u.args[:2]:
            st, sa = shapes.get(t), shapes.get(ours[0]) if ours else None
            if t in ours or not isinstance(t, Node) or not gu.is_tensor_shape(st) \
                    or not gu.is_tensor_shape(sa) or len(st) != len(sa) or st[0] != 1:
                continue
            if any(st[d] == sa[d] == seq for d in range(1, len(sa))) and seq > 1:
                found.append((u, t))
    order = {n: i for i, n in enumerate(b.merge_at.graph.nodes)}
    return sorted(found, key=lambda f: order[f[0]])


def rope_reason(tables) -> str:
    """Why a grid with per-token position tables on its queries and keys is not merged."""
    names = sorted({p.name for _, t in tables for p in gu.ancestors_within(t, 1000)
                    if p.op == "placeholder"})
    where = ", ".join(names) or tables[0][1].name
    return (f"rotary position embedding on the queries and keys ({where}): merged tokens have "
            "no per-token rotary position")


def follow_tables(graph, b: LocalBlock, match: Node, shapes) -> None:
    """Each position table of the op (``position_tables``) taken at the merged tokens."""
    made = {}
    for u, t in position_tables(b, shapes):
        if t not in made:
            with graph.inserting_before(u):
                made[t] = inserted(graph.call_function(tomesd_table, (t, match)),
                                   "position_table", site=b.index)
        u.replace_input_with(t, made[t])
    for u in gu.between(b.merge_at, b.op_out):  # the rotation's pairs stacked on a new last dim
        if gu.packet(u) is torch.ops.aten.stack and gu.arg(u, 1, "dim", 0) == -1:
            u.meta["tome"] = {"role": "rope_stack", "inserted": True}  # tokens keep their dim


def follow_joint_split(graph, b: LocalBlock, x, shapes) -> None:
    """MM-DiT joint attention runs on [image tokens, text tokens] and splits its output at the
    image token count, which export bakes (``out[:, :N]``, ``out[:, N:]``): the split point
    becomes the merged count, read from the merged tokens ``x``."""
    n, seen, frontier = b.tokens, set(), [b.core.out]
    count = None
    if shapes[b.merge_at][1] != n:  # text and image tokens merged as one (Flux single-stream)
        return
    for _ in range(8):  # a few layout ops after the attention
        nxt = []
        for node in frontier:
            for u in list(node.users):
                if u in seen:
                    continue
                seen.add(u)
                s = shapes.get(node)
                if gu.packet(u) is torch.ops.aten.split_with_sizes and gu.arg(u, 2, "dim", 0) == 1:
                    count = count or _count(graph, x)
                    sizes = [count if _int_value(v, shapes) == n else v for v in u.args[1]]
                    u.update_arg(1, sizes)  # Flux: [text, image] split at the text count
                    u.meta["tome"] = {"role": "joint_split", "inserted": True}
                    continue
                if (gu.packet(u) is torch.ops.aten.slice and gu.is_tensor_shape(s) and len(s) > 1
                        and s[1] > n and gu.arg(u, 1, "dim", 0) == 1):
                    # bounds as export bakes them, or symbolic (dynamic image sizes): by value
                    start, end = (_int_value(v, shapes) for v in
                                  (gu.arg(u, 2, "start", None), gu.arg(u, 3, "end", None)))
                    start = 0 if start is None else start
                    if (start, end) == (0, n) or (start == n and (end is None or isinstance(
                            end, int) and end >= s[1])):
                        count = count or _count(graph, x)
                        gu.set_arg(u, 3 if start == 0 else 2, "end" if start == 0 else "start",
                                   count)
                        u.meta["tome"] = {"role": "joint_split", "inserted": True}
                        continue
                nxt.append(u)
        frontier = nxt
    if count is None:
        return
    for side in (b.core.query, b.core.keys, values_of(b.core)):  # image and text joined
        for cat in gu.ancestors_within(side, 8):  # the join, or layout ops after it (Flux)
            if gu.is_call(cat, gu.CAT) and any(x in gu.ancestors_within(p, 12)
                                               for p in cat.args[0]):
                cat.meta["tome"] = {"role": "joint_cat", "inserted": True}  # the split follows


ARITH = {operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
         operator.floordiv: operator.floordiv}


def _int_value(v, shapes, depth: int = 12):
    """The value of a slice bound: an int, or a symbolic size (dynamic image sizes) computed
    from recorded shapes; None when not known."""
    if v is None or isinstance(v, int) or not isinstance(v, fx.Node) or depth == 0:
        return v if isinstance(v, int) or v is None else None
    if v.target is torch.ops.aten.sym_size.int:
        s = shapes.get(v.args[0])
        return s[v.args[1]] if gu.is_tensor_shape(s) else None
    if v.target in ARITH and len(v.args) == 2:
        a, b = (_int_value(x, shapes, depth - 1) for x in v.args)
        return None if a is None or b is None else ARITH[v.target](a, b)
    return None


