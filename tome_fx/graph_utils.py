"""Small helpers to read fx graphs: op recognition, shapes, def-use walks."""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map

Node = fx.Node
aten = torch.ops.aten

# Each set holds the torch functions of an fx graph and the ATen op packets of a torch.export
# graph (``is_call`` matches an OpOverload such as ``aten.add.Tensor`` by its packet).
SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
        aten.scaled_dot_product_attention}
SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax, aten.softmax,
           aten._softmax}
MATMUL = {operator.matmul, torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm,
          aten.matmul, aten.bmm}
ADD = {operator.add, operator.iadd, torch.add, torch.Tensor.add, aten.add}
SCALE = {operator.mul, operator.truediv, torch.mul, torch.div, aten.mul, aten.div}
CAST = {aten.to, aten._to_copy, aten.type_as, aten.contiguous, aten.clone, aten.alias}
TRANSPOSE = {torch.transpose, aten.transpose}
CAT = {torch.cat, torch.concat, torch.concatenate, aten.cat, aten.concat}
LINEAR_FUNCS = {F.linear, aten.linear, aten.addmm}
CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution}
DROPOUT_FUNCS = {F.dropout, aten.dropout}
NORM_FUNCS = {F.layer_norm, F.group_norm, aten.layer_norm, aten.group_norm} | (
    {F.rms_norm, aten.rms_norm} if hasattr(F, "rms_norm") else set())
NORM_MODULES = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
LINEAR_MODULES = (nn.Linear,)
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)


def module_of(gm: fx.GraphModule, node: Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def packet(node: Node):
    """The ATen op packet of a call (``aten.add`` for ``aten.add.Tensor``), else None."""
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def is_call(node: Node, funcs: set, methods: Iterable[str] = ()) -> bool:
    if node.op == "call_function":
        return node.target in funcs or packet(node) in funcs
    if node.op == "call_method":
        return node.target in methods
    return False


def is_sdpa(node: Node) -> bool:
    return is_call(node, SDPA)


def is_softmax(gm: fx.GraphModule, node: Node) -> bool:
    if is_call(node, SOFTMAX, ("softmax",)):
        return True
    return isinstance(module_of(gm, node), nn.Softmax)


def is_matmul(node: Node) -> bool:
    return is_call(node, MATMUL, ("matmul", "bmm", "__matmul__"))


def is_add(node: Node) -> bool:
    return is_call(node, ADD, ("add", "__add__"))


def is_norm(gm: fx.GraphModule, node: Node) -> bool:
    return is_call(node, NORM_FUNCS) or isinstance(module_of(gm, node), NORM_MODULES)


def is_linear(gm: fx.GraphModule, node: Node) -> bool:
    return is_call(node, LINEAR_FUNCS) or isinstance(module_of(gm, node), LINEAR_MODULES)


def is_conv(gm: fx.GraphModule, node: Node) -> bool:
    """A convolution of any rank (its output's rank tells which)."""
    return is_call(node, CONV_FUNCS) or isinstance(module_of(gm, node), CONV_MODULES)


def is_dropout(gm: fx.GraphModule, node: Node) -> bool:
    if is_call(node, DROPOUT_FUNCS, ("dropout",)):
        return True
    return isinstance(module_of(gm, node), DROPOUT_MODULES)


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: Node, index: int, name: str, value: Any) -> None:
    """Set a call's argument where it was passed: by position if it was, else by keyword."""
    if len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def node_inputs(node: Node) -> list[Node]:
    return list(node.all_input_nodes)


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


def record_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[dict, Any]:
    rec = ShapeRecorder(gm)
    with torch.no_grad():
        out = run_interpreter(rec, gm, args, kwargs)
    return rec.shapes, out


def run_interpreter(rec: fx.Interpreter, gm: fx.GraphModule, args: tuple, kwargs: dict):
    """fx.Interpreter.run takes positional args only: order kwargs by placeholder."""
    if not kwargs:
        return rec.run(*args)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    full = list(args)
    for p in placeholders[len(args) :]:
        if p.target in kwargs:
            full.append(kwargs[p.target])
        elif p.args:
            full.append(p.args[0])
        else:
            full.append(None)
    return rec.run(*full)


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
