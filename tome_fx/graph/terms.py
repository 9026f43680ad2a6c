"""What surrounds an attention, for the reasons it is refused: the terms of a sum added to its
logits (an input mask applied to a position-bias table), and the window partition of the token
stream in front of it."""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .nodes import CAST, is_add, is_call, is_index, is_masked_fill
from .run import is_tensor_shape
from .walk import between

Node = fx.Node
_A = torch.ops.aten
# ops that pass their first input's values on (casts, layout, broadcast)
_PASS = CAST | {_A.expand, _A.unsqueeze, _A.squeeze, _A.view, _A.reshape, _A.permute,
                torch.unsqueeze, torch.reshape, torch.permute}
_PASS_METHODS = ("contiguous", "clone", "to", "float", "type_as", "expand", "unsqueeze",
                 "squeeze", "view", "reshape", "permute")
_WHERE = {torch.where, _A.where}


def addends(node: Node, limit: int = 16) -> list[Node]:
    """The terms of the sum ``node`` holds, through adds, casts, layout ops and the values a
    mask selects (``where(mask, bias, fill)``, ``bias.masked_fill(mask, v)``): T5 passes its
    position bias with the padding mask folded in."""
    out, todo, seen = [], [node], set()
    while todo and len(seen) < limit:
        t = todo.pop()
        if not isinstance(t, Node) or t in seen:
            continue
        seen.add(t)
        if is_add(t):
            todo += list(t.args[:2])
        elif is_call(t, _WHERE):
            todo += list(t.args[1:3])
        elif is_masked_fill(t) or is_index(t) or is_call(t, _PASS, _PASS_METHODS):
            todo.append(t.args[0])
        else:
            out.append(t)
    return out


def window_partition(stream: Node, keys: Node, shapes: dict, tokens: int) -> Node | None:
    """The node between the residual ``stream`` [B, ..., C] and an attention's ``keys`` that
    holds the stream's tokens in windows of the attention's ``tokens`` ([B * windows, ...,
    C], its middle dims ``tokens`` in all; one padded window too), when the stream holds
    another count; else None."""
    shape = shapes.get(stream)
    if not is_tensor_shape(shape) or len(shape) < 3 or math.prod(shape[1:-1]) == tokens:
        return None
    batch = shape[0]
    for n in between(stream, keys):
        s = shapes.get(n)
        if (is_tensor_shape(s) and len(s) >= 3 and s[0] % batch == 0
                and math.prod(s[1:-1]) == tokens):
            return n
    return None
