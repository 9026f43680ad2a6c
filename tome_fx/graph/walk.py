"""Def-use walks: ancestors, descendants, the nodes on paths between two nodes, and the leading
tokens that do not come from the input."""
from __future__ import annotations

import torch.fx as fx

from .nodes import CAT, arg, index_entry, is_call, is_index
from .run import is_tensor_shape

Node = fx.Node


def ancestors_within(node: Node, depth: int) -> set[Node]:
    seen, frontier = {node}, [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for i in n.all_input_nodes:
                if i not in seen:
                    seen.add(i)
                    nxt.append(i)
        frontier = nxt
    return seen


def ancestors(node: Node) -> set[Node]:
    """``node`` and every node it is computed from."""
    seen, todo = {node}, [node]
    while todo:
        for i in todo.pop().all_input_nodes:
            if i not in seen:
                seen.add(i)
                todo.append(i)
    return seen


def descendants(starts, through=None) -> set[Node]:
    """Nodes reachable from ``starts`` along def-use edges (``starts`` excluded unless
    reached again). ``through(user, node)``: follow only edges it accepts."""
    seen, stack = set(), list(starts)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen and (through is None or through(u, n)):
                seen.add(u)
                stack.append(u)
    return seen


def chains(pairs) -> list[int]:
    """For (entry, exit) node pairs in graph order (a block's stream input and its merge point),
    the index of the first pair of the chain each continues: the latest earlier pair whose exit
    is an ancestor of its entry, else itself. Two towers (CLIP's vision and text) are two chains:
    tokens, sizes and padding of one never reach the other."""
    heads: list[int] = []
    for j, (entry, _) in enumerate(pairs):
        up = ancestors(entry)
        before = [i for i in range(j) if pairs[i][1] in up]
        heads.append(heads[before[-1]] if before else j)
    return heads


def between(start: Node, end: Node) -> list[Node]:
    """Nodes on def-use paths from ``start`` to ``end`` (``end`` included, ``start`` not),
    in graph order."""
    down = descendants([start])
    up, todo = {end}, [end]
    while todo:
        for i in todo.pop().all_input_nodes:
            if i in down and i not in up:
                up.add(i)
                todo.append(i)
    return [n for n in start.graph.nodes if n in up and n in down]


def fixed_lead(node: Node, shapes, dependent: set, tdim: int, depth: int = 40) -> int:
    """How many leading tokens (along ``tdim``) of ``node`` do not depend on the input, found
    through concatenations and slices along the tokens and ops that keep the shape."""
    for _ in range(depth):
        shape = shapes.get(node)
        if not is_tensor_shape(shape) or len(shape) != 3:
            return 0
        if node not in dependent:
            return shape[tdim]
        if is_call(node, CAT):
            if arg(node, 1, "dim", 0) % 3 != tdim:
                return 0
            lead = 0
            for t in node.args[0]:
                own = fixed_lead(t, shapes, dependent, tdim, depth - 1)
                lead += own
                if own < shapes[t][tdim]:
                    return lead
            return 0
        if is_index(node):
            src = node.args[0]
            if not isinstance(src, Node) or not is_tensor_shape(shapes.get(src)):
                return 0
            entry = index_entry(node, shapes[src], tdim)
            if not isinstance(entry, slice) or entry.step not in (None, 1):
                return 0
            start = 0 if entry.start is None else entry.start
            if not isinstance(start, int) or start < 0:
                return 0
            lead = fixed_lead(src, shapes, dependent, tdim, depth - 1)
            return max(0, min(lead, start + shape[tdim]) - start)
        ins = [i for i in node.all_input_nodes if i in dependent and shapes.get(i) == shape]
        if len(ins) != 1:
            return 0
        node = ins[0]
    return 0
