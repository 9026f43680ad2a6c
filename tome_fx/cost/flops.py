"""FLOPs per graph node, measured by running a rewritten graph at chosen merge amounts.

Counting convention: 2 FLOPs per multiply-add, as ``torch.utils.flop_counter.FlopCounterMode``
(which counts matrix products, convolutions and attention; element-wise ops count 0). Linear
layers, convolutions, matrix products and fused attention are priced here from their tensors
(``2*rows*in*out``, ``2*out*K``, ``2*B*H*Lq*Lk*(d_qk + d_v)``); any other op FlopCounterMode
counts is measured with it, node by node.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .. import graph as gu
from ..kernels.tome import ab_sizes, merge_limit, tome_merge

_LINEAR_FUNCS = {F.linear, torch._C._nn.linear, gu.aten.linear}  # not addmm: its args differ
_MERGE_SIGNATURE = inspect.signature(tome_merge)


def merge_flops(tokens: int, r: int, prefix: int, batch: int, dim: int) -> int:
    """FLOPs of one ``tome_merge`` on ``tokens`` tokens: its A x B cosine-score product."""
    if min(r, merge_limit(tokens, prefix)) <= 0:
        return 0
    n_a, n_b = ab_sizes(tokens, prefix)
    return 2 * batch * n_a * n_b * dim


def _transposed_conv(n: fx.Node) -> bool:
    return gu.packet(n) is gu.aten.convolution and bool(gu.arg(n, 6, "transposed", False))


def _weight(args, kwargs):
    """The weight of a linear or convolution call, passed by position or keyword."""
    return args[1] if len(args) > 1 else kwargs["weight"]


def known_flops(gm: fx.GraphModule, n: fx.Node, args, kwargs, out) -> int | None:
    """FLOPs of a recognised op from its actual tensors; None if the op is not recognised."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if isinstance(mod, nn.Linear):
            return 2 * args[0].numel() * mod.out_features
        if isinstance(mod, gu.CONV_MODULES) and isinstance(out, torch.Tensor):
            return 2 * out.numel() * math.prod(mod.weight.shape[1:])
        return None
    if gu.is_call(n, _LINEAR_FUNCS):
        return 2 * args[0].numel() * _weight(args, kwargs).shape[0]
    if gu.is_call(n, gu.CONV_FUNCS) and isinstance(out, torch.Tensor) and not _transposed_conv(n):
        return 2 * out.numel() * math.prod(_weight(args, kwargs).shape[1:])
    if gu.is_matmul(n) and isinstance(out, torch.Tensor):
        return 2 * out.numel() * args[0].shape[-1]
    if gu.is_sdpa(n):
        q, k, v = args[0], args[1], args[2]
        return 2 * math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return None


class FlopRun(fx.Interpreter):
    """Runs a rewritten graph; records FLOPs per node (``count``), each ToMe merge's
    (tokens, batch, key dimension), and the size of each ``watch`` node along its dimension."""

    def __init__(self, gm: fx.GraphModule, count: bool = True, watch: dict | None = None):
        super().__init__(gm)
        self.count, self.watch = count, watch or {}
        self.sizes: dict[fx.Node, int] = {}
        self.flops: dict[fx.Node, int] = {}
        self.merges: dict[fx.Node, tuple[int, int, int]] = {}  # node -> (tokens, batch, dim)
        self.result: Any = None  # the graph's output

    def run_node(self, n: fx.Node) -> Any:
        out = self._node(n)
        if n in self.watch:
            self.sizes[n] = out.shape[self.watch[n]]
        return out

    def _node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
        call = lambda: getattr(self, n.op)(n.target, args, kwargs)  # noqa: E731
        if n.op == "call_function" and n.target is tome_merge:
            a = _MERGE_SIGNATURE.bind(*args, **kwargs).arguments
            keys = a["keys"]
            dim = keys.shape[-2] if a.get("keys_transposed") else keys.shape[-1]
            self.merges[n] = (a["x"].shape[1], a["x"].shape[0], dim)
            return call()
        if not self.count or n.op not in ("call_module", "call_function", "call_method"):
            return call()
        if n.op == "call_module" or gu.is_matmul(n) or gu.is_sdpa(n) or gu.is_call(
                n, _LINEAR_FUNCS | gu.CONV_FUNCS):
            out = call()
            f = known_flops(self.module, n, args, kwargs, out)
            if f is not None:
                self.flops[n] = f
                return out
        with FlopCounterMode(display=False) as fc:  # anything else FlopCounterMode counts
            out = call()
        if fc.get_total_flops():
            self.flops[n] = fc.get_total_flops()
        return out


def run_flops(gm: fx.GraphModule, inputs: tuple, r=None, count: bool = True,
              watch: dict | None = None) -> FlopRun:
    """``FlopRun`` of ``gm`` on ``inputs`` = (args, kwargs), every merge at ``r`` (an int, a
    dict merge -> r, or None: as the graph has it); ``watch``: node -> dimension to record."""
    run = FlopRun(gm, count, watch)
    merges = gu.merge_nodes(gm) if isinstance(r, int) else list(r or ())
    with gu.merges_at(gm, r if r is not None else {}, merges), torch.no_grad():
        run.result = gu.run_interpreter(run, gm, *inputs)
    return run
