"""Def-use walks: ancestors, descendants, and the nodes on paths between two nodes."""
from __future__ import annotations

import torch.fx as fx

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
