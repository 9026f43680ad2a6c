"""Running a graph on example inputs: shapes per node, values of chosen nodes, which values
depend on the inputs, and running with some call arguments temporarily changed."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch.utils._pytree import tree_map

from .nodes import is_call

Node = fx.Node


class ShapeRecorder(fx.Interpreter):
    """Runs a graph and records each node's output shape(s) (None for non-tensors)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        self.shapes[n] = tree_map(
            lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else None, result
        )
        return result


class ValueRecorder(fx.Interpreter):
    """Runs a graph and keeps the values of the ``wanted`` nodes."""

    def __init__(self, gm: fx.GraphModule, wanted):
        super().__init__(gm)
        self.wanted, self.values = set(wanted), {}

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def placeholder_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The value of every placeholder, in order: ``args`` first, then ``kwargs`` by name, then
    the placeholder's default. A graph with export's calling convention flattens nested inputs
    (a dict of tensors, diffusers' ``added_cond_kwargs``) as its forward does."""
    spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "in_spec", None)
    if spec is not None:
        try:
            return list(fx_pytree.tree_flatten_spec((args, kwargs), spec))
        except (KeyError, TypeError, ValueError, RuntimeError):  # another structure: by name
            pass
    out = list(args)
    for p in [n for n in gm.graph.nodes if n.op == "placeholder"][len(args):]:
        out.append(kwargs[p.target] if p.target in kwargs else p.args[0] if p.args else None)
    return out


def run_interpreter(rec: fx.Interpreter, gm: fx.GraphModule, args: tuple, kwargs: dict):
    """fx.Interpreter.run takes positional args only: order kwargs by placeholder."""
    return rec.run(*placeholder_values(gm, args, kwargs))


def record_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[dict, Any]:
    rec = ShapeRecorder(gm)
    with torch.no_grad():
        out = run_interpreter(rec, gm, args, kwargs)
    return rec.shapes, out


def record_values(gm: fx.GraphModule, inputs: list, wanted) -> dict:
    """Values of the ``wanted`` nodes with the placeholders set to ``inputs``."""
    rec = ValueRecorder(gm, wanted)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values


@contextlib.contextmanager
def overriding(gm: fx.GraphModule, changes: dict):
    """Run ``gm`` with some call arguments changed: ``changes`` maps a node to
    ``{position: value}``; each is restored (and ``gm`` recompiled) on exit."""
    saved = {n: {i: n.args[i] for i in pos} for n, pos in changes.items()}
    try:
        for n, pos in changes.items():
            for i, value in pos.items():
                n.update_arg(i, value)
        gm.recompile()
        yield gm
    finally:
        for n, pos in saved.items():
            for i, value in pos.items():
                n.update_arg(i, value)
        gm.recompile()


def is_tensor_shape(s: Any) -> bool:
    return isinstance(s, tuple) and all(isinstance(d, int) for d in s)


def has_tensor(s: Any) -> bool:
    """Whether a recorded shape entry holds at least one tensor."""
    if is_tensor_shape(s):
        return True
    if isinstance(s, (tuple, list)):
        return any(has_tensor(x) for x in s)
    if isinstance(s, dict):
        return any(has_tensor(x) for x in s.values())
    return False


def token_dims(a, b) -> tuple:
    """Dimensions of one output whose size differs between two runs (``("nested",)`` for a
    tuple holding such a tensor): where merged (or dropped) tokens are."""
    if is_tensor_shape(a) and is_tensor_shape(b) and len(a) == len(b):
        return tuple(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        if any(token_dims(x, y) for x, y in zip(a, b)):
            return ("nested",)
    return ()


# Ops whose values depend on their tensor inputs' shapes only (``torch.ones_like(x)``).
SHAPE_ONLY = {torch.ones_like, torch.zeros_like, torch.full_like, torch.empty_like}
SHAPE_ONLY_METHODS = ("new_ones", "new_zeros", "new_full", "new_empty")


def data_dependent(gm: fx.GraphModule, shapes: dict) -> set[Node]:
    """Nodes whose tensor values depend on a model input (not only through shapes)."""
    dep: set[Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            dep.add(n)
        elif is_call(n, SHAPE_ONLY, SHAPE_ONLY_METHODS):
            continue
        elif n.op != "get_attr" and any(i in dep for i in n.all_input_nodes):
            if has_tensor(shapes.get(n)):
                dep.add(n)
    return dep
