"""Shape repair: token counts baked into shape arguments follow the merges.

A torch.export graph is static in the token count: ``aten.view(x, [B, 197, -1, 64])`` holds
197 as a literal. Downstream of a merge such an argument must become the merged count. The
pass finds them by shape propagation, never by value alone:

* the graph is run with every merge at r=0 (shapes recorded), then at r=1;
* at a ``view``/``reshape``/``expand`` whose input has exactly one dimension that differs between
  the runs (the token dimension ``t``), the output dimension ``j`` that carries it is the one
  with the same size and the same product of leading sizes (for ``expand``: the aligned
  trailing dimension); a literal equal to the token count at ``j`` is replaced by
  ``aten.sym_size.int(input, t)``, so the argument is right for every r;
* the repaired op is run at r=1 and its output must equal the r=0 shape with dimension ``j``
  replaced by the merged count.

A shape op that folds or splits the token dimension, or whose argument at ``j`` is not the
token count, is returned as unsafe with the reason; the caller switches off the merges
upstream of it. Ops that fail for other reasons are left to the token-flow check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import graph as gu
from .base import Context, PassResult, finish, inserted

Node = fx.Node
aten = torch.ops.aten
SHAPE_OPS = {aten.view, aten.reshape, aten._unsafe_view, aten.expand}


@dataclass(frozen=True)
class Repair:
    node: Node  # the shape op
    position: int  # entry of its size list that holds the token count
    source: Node  # the tensor whose token dimension gives the size
    dim: int  # that token dimension


@dataclass
class ShapeRepairs:
    repairs: list[Repair] = field(default_factory=list)
    unsafe: list[tuple[Node, str]] = field(default_factory=list)


class _Stop(Exception):
    pass


class _Repairer(fx.Interpreter):
    """Runs the graph at r=1; at shape ops on merged tokens, finds and applies the repair."""

    def __init__(self, gm: fx.GraphModule, shapes0: dict, found: ShapeRepairs):
        super().__init__(gm)
        self.shapes0 = shapes0
        self.found = found

    def run_node(self, n: Node):
        if gu.is_call(n, SHAPE_OPS) and isinstance(n.args[0], Node):
            x = self.env.get(n.args[0])
            s0 = self.shapes0.get(n.args[0])
            if isinstance(x, torch.Tensor) and gu.is_tensor_shape(s0) and tuple(x.shape) != s0:
                return self._repair(n, x, s0)
        try:
            return super().run_node(n)
        except Exception as exc:  # not a shape op we repair: the token-flow check reports it
            raise _Stop() from exc

    def _unsafe(self, n: Node, reason: str):
        self.found.unsafe.append((n, reason))
        raise _Stop()

    def _repair(self, n: Node, x: torch.Tensor, in0: tuple):
        out0 = self.shapes0.get(n)
        name = gu.packet(n).__name__ if gu.packet(n) else str(n.target)
        if x.dim() != len(in0) or not gu.is_tensor_shape(out0):
            self._unsafe(n, f"{name} on merged tokens changes rank ({n.name})")
        changed = [d for d in range(x.dim()) if x.shape[d] != in0[d]]
        if len(changed) != 1:
            self._unsafe(n, f"{name} on a tensor with several merged dimensions ({n.name})")
        t = changed[0]
        n0, n1 = in0[t], x.shape[t]
        if gu.packet(n) is aten.expand:
            js = [t + len(out0) - len(in0)]
        else:
            lead = math.prod(in0[:t])
            js = [j for j in range(len(out0)) if out0[j] == n0 and math.prod(out0[:j]) == lead]
        if len(js) != 1 or not 0 <= js[0] < len(out0) or out0[js[0]] != n0:
            self._unsafe(n, f"{name} folds or splits the token dimension ({n.name})")
        j = js[0]
        spec = list(n.args[1])
        fargs, kwargs = self.fetch_args_kwargs_from_env(n)
        size = list(fargs[1])
        entry = spec[j]
        baked = isinstance(entry, int) and not isinstance(entry, bool) and entry == n0
        if baked or (isinstance(entry, Node) and size[j] == n0):  # a literal or an input's size
            self.found.repairs.append(Repair(n, j, n.args[0], t))
            size[j] = n1
        elif not (entry == -1 or (isinstance(entry, Node) and size[j] == n1)):
            self._unsafe(n, f"{name} size argument {j} ({entry}) is not the token count "
                            f"({n0}) ({n.name})")
        out = n.target(x, size, **kwargs)
        expected = list(out0)
        expected[j] = n1
        if list(out.shape) != expected:
            self._unsafe(n, f"{name} does not follow the merged token count ({n.name})")
        return out


def repair_shapes(ctx: Context) -> PassResult:
    """Rewrite baked token counts downstream of the merges; count = entries fixed.
    ``info`` is a ShapeRepairs: the repairs made and the unsafe (node, reason) pairs."""
    gm, found = ctx.gm, ShapeRepairs()
    if not ctx.sites:
        return PassResult(gm, 0, found)
    with gu.merges_at(gm, 0, ctx.merges):
        shapes0, _ = gu.record_shapes(gm, ctx.args, ctx.kwargs)
    with gu.merges_at(gm, 1, ctx.merges), torch.no_grad():
        try:
            gu.run_interpreter(_Repairer(gm, shapes0, found), gm, ctx.args, ctx.kwargs)
        except _Stop:
            pass
    graph = gm.graph
    for rep in found.repairs:
        with graph.inserting_before(rep.node):
            size = inserted(graph.call_function(aten.sym_size.int, (rep.source, rep.dim)), "shape")
        spec = list(rep.node.args[1])
        spec[rep.position] = size
        rep.node.update_arg(1, spec)
        rep.node.meta.setdefault("tome", {"role": "shape_repair", "entry": rep.position})
    return PassResult(finish(gm), len(found.repairs), found)
