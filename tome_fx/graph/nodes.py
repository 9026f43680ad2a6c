"""Op recognition in fx graphs: which call a node is (torch function, method, module, or the
ATen op of a torch.export graph), and its arguments by position or keyword."""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "aten", "SDPA", "SOFTMAX", "MATMUL", "ADD", "MASKED_FILL", "SCALE", "CAST", "TRANSPOSE", "CAT",
    "LINEAR_FUNCS", "CONV_FUNCS", "DROPOUT_FUNCS", "NORM_FUNCS", "NORM_MODULES", "LINEAR_MODULES",
    "CONV_MODULES", "DROPOUT_MODULES", "module_of", "packet", "is_call", "is_sdpa", "is_softmax",
    "is_matmul", "is_add", "is_masked_fill", "is_norm", "is_linear", "is_conv", "is_dropout", "arg",
    "set_arg", "is_meta", "INDEX", "is_index", "index_entry",
]

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
MASKED_FILL = {torch.Tensor.masked_fill, torch.masked_fill, aten.masked_fill}
SCALE = {operator.mul, operator.truediv, torch.mul, torch.div, aten.mul, aten.div}
CAST = {aten.to, aten._to_copy, aten.type_as, aten.contiguous, aten.clone, aten.alias}
TRANSPOSE = {torch.transpose, aten.transpose}
CAT = {torch.cat, torch.concat, torch.concatenate, aten.cat, aten.concat}
LINEAR_FUNCS = {F.linear, aten.linear, aten.addmm}
CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution}
DROPOUT_FUNCS = {F.dropout, aten.dropout}
INDEX = {aten.select, aten.slice}  # a getitem of an fx graph, as ATen writes it
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


def is_masked_fill(node: Node) -> bool:
    return is_call(node, MASKED_FILL, ("masked_fill",))


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


_META_METHODS = {"size", "dim", "numel", "__len__", "get_device"}
_META_ATEN = {aten.sym_size, aten.sym_numel, aten.sym_stride, aten._assert_tensor_metadata}


def is_meta(node: Node) -> bool:
    """Reads only metadata (shape, dtype, device) of its input, not values."""
    if node.op == "call_function" and (node.target is getattr or packet(node) in _META_ATEN):
        return True
    return is_call(node, set(), _META_METHODS)


def is_index(node: Node) -> bool:
    """``x[...]`` (a getitem) or an ATen select/slice."""
    return (node.op == "call_function" and node.target is operator.getitem) or is_call(node, INDEX)


def index_entry(node: Node, in_shape, dim: int):
    """What an index node (``is_index``) takes from dimension ``dim`` of its input: an int, a
    slice, or "unsupported" (advanced indexing). An ATen slice end at or past the dimension's
    size is open (export bakes ``x[:, 1:]`` as ``end=N`` or INT64_MAX)."""
    ndim = len(in_shape)
    if is_call(node, INDEX):
        if arg(node, 1, "dim", 0) % ndim != dim:
            return slice(None)
        if packet(node) is aten.select:
            return arg(node, 2, "index")
        start, end = arg(node, 2, "start", None), arg(node, 3, "end", None)
        if isinstance(end, int) and end >= in_shape[dim]:
            end = None
        return slice(start, end, arg(node, 4, "step", 1))
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if any(isinstance(i, (Node, torch.Tensor, list)) for i in idx):
        return "unsupported"
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded = []
    for i in idx:
        expanded.extend([slice(None)] * (ndim - consumed) if i is Ellipsis else [i])
    dims = [i for i in expanded if i is not None]
    return dims[dim] if dim < len(dims) else slice(None)
