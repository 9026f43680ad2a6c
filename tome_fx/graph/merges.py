"""The merge-node contract: how passes find merge calls and read or set their arguments.

A merge is a ``call_function`` node tagged ``node.meta["tome"]["role"] == "merge"`` (the method's
kernel: ``kernels.tome.tome_merge``, ``kernels.tomato.tomato_merge``). Every merge kernel takes
``x, ..., size, r, ...`` and optionally ``origin, groups`` (padding groups, see
``passes/follow.py``), and returns ``(x, size)``, or ``(x, size, origin)`` with groups. Its
arguments are read and set by name, through the kernel's signature, never by position.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch.fx as fx

from .run import overriding

Node = fx.Node


def is_merge(node: Node) -> bool:
    return node.op == "call_function" and node.meta.get("tome", {}).get("role") == "merge"


def merge_nodes(gm: fx.GraphModule) -> list[Node]:
    """The merges in graph order."""
    return [n for n in gm.graph.nodes if is_merge(n)]


def _position(node: Node, name: str) -> int:
    return list(inspect.signature(node.target).parameters).index(name)


def takes_arg(node: Node, name: str) -> bool:
    """Whether the merge's kernel has an argument ``name`` (methods' kernels differ)."""
    return name in inspect.signature(node.target).parameters


def merge_arg(node: Node, name: str, default: Any = None) -> Any:
    i = _position(node, name)
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def set_merge_arg(node: Node, name: str, value: Any) -> None:
    """Set argument ``name`` of a merge, passing the ones before it positionally."""
    i = _position(node, name)
    if len(node.args) > i:
        node.update_arg(i, value)
        return
    params = list(inspect.signature(node.target).parameters.values())
    args = list(node.args)
    kwargs = dict(node.kwargs)
    for p in params[len(args):i]:
        args.append(kwargs.pop(p.name, p.default))
    node.args, node.kwargs = (*args, value), {k: v for k, v in kwargs.items() if k != name}


@contextlib.contextmanager
def merges_at(gm: fx.GraphModule, r, merges=None):
    """Run ``gm`` with every merge (or ``merges``) at ``r``: one int for all, or a dict
    merge -> r. The real values come back on exit."""
    merges = merge_nodes(gm) if merges is None else list(merges)
    values = r if isinstance(r, dict) else {m: r for m in merges}
    with overriding(gm, {m: {_position(m, "r"): values[m]} for m in merges if m in values}):
        yield gm
