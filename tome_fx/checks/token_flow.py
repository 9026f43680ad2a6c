"""Check every op that touches merged tokens, by running the rewritten graph twice.

Token dimensions are found by shape propagation, not by guessing: the graph is run once with
every merge at r=0 and once at r=1; a dimension whose size differs between the runs carries
merged tokens. Each op that consumes such a tensor must be one the merge keeps exact in meaning
(per-token ops, layout ops that keep the token dimension, recognised attention cores, reads of
protected prefix tokens, means over tokens — which become size-weighted). Anything else is
reported with the node, so the merges upstream of it can be switched off.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import graph as gu
from ..capture import float_mask
from ..errors import one_line
from ..passes.base import Context
from .token_probe import probe_block

Node = fx.Node

_ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.neg,
    torch.tanh, torch.sigmoid, torch.exp, torch.sqrt, torch.rsqrt, torch.erf, torch.where,
    F.gelu, F.relu, F.silu, F.sigmoid, F.tanh, F.dropout, F.hardswish, F.mish, F.leaky_relu,
    F.elu, F.softplus, torch.clamp, torch.abs, float_mask,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "neg", "pow", "__add__", "__mul__", "__sub__", "__truediv__",
    "__radd__", "__rmul__", "gelu", "relu", "sigmoid", "tanh", "exp", "sqrt", "rsqrt", "float",
    "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone", "detach", "clamp",
    "abs", "masked_fill", "add_", "mul_",
}
_CHANNEL_FUNCS = {F.linear, F.layer_norm} | ({F.rms_norm} if hasattr(F, "rms_norm") else set())
_LAYOUT_METHODS = {
    "reshape", "view", "permute", "transpose", "flatten", "unflatten", "unsqueeze", "squeeze",
    "expand", "expand_as", "chunk", "split", "unbind", "view_as", "reshape_as",
}
_LAYOUT_FUNCS = {
    torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.unflatten,
    torch.unsqueeze, torch.squeeze, torch.chunk, torch.split, torch.unbind,
}
_ACTIVATIONS = (
    nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU,
    nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
)
_CHANNEL_MODULES = (nn.Linear, nn.LayerNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

# The same ops in a torch.export (ATen) graph, matched by op packet (gu.is_call).
_A = torch.ops.aten
_ELEMENTWISE_FUNCS |= {
    _A.add, _A.sub, _A.rsub, _A.mul, _A.div, _A.neg, _A.pow, _A.tanh, _A.sigmoid, _A.exp,
    _A.sqrt, _A.rsqrt, _A.erf, _A.where, _A.gelu, _A.relu, _A.silu, _A.dropout, _A.hardswish,
    _A.mish, _A.leaky_relu, _A.elu, _A.softplus, _A.clamp, _A.abs, _A.to, _A._to_copy,
    _A.type_as, _A.contiguous, _A.clone, _A.detach, _A.alias, _A.masked_fill, _A.add_, _A.mul_,
}
_CHANNEL_FUNCS |= {_A.linear, _A.layer_norm, _A.rms_norm}
_LAYOUT_FUNCS |= {
    _A.view, _A.reshape, _A._unsafe_view, _A.permute, _A.transpose, _A.flatten, _A.unflatten,
    _A.unsqueeze, _A.squeeze, _A.expand, _A.chunk, _A.split, _A.split_with_sizes, _A.unbind,
}
_EXTREMES = {torch.max, torch.min, torch.amax, torch.amin, torch.argmax, torch.argmin,
             torch.logsumexp, _A.max, _A.min, _A.amax, _A.amin, _A.argmax, _A.argmin, _A.logsumexp}
_ARGS, _ARGS_M = {torch.argmax, torch.argmin, _A.argmax, _A.argmin}, ("argmax", "argmin")


@dataclass
class Pool:
    node: Node  # the mean over tokens
    dim: int
    size: Node  # size companion of the merge the tokens come from
    offset: int  # the tokens were sliced as x[:, offset:] after that merge
    kind: str = "mean"  # "mean" | "sum": both become size-weighted


@dataclass(frozen=True)
class Exit:
    """A place where merged tokens could go back to the original layout (``passes.unmerge``):
    a graph output, or a layout op that folds the token dimension into a grid."""

    consumer: Node
    src: Node  # the consumer's input that carries merged tokens
    dim: int  # its token dimension
    offset: int  # ``src`` holds the tokens from this position on (a slice past the prefix)
    why: str


@dataclass
class Flow:
    unsafe: list[tuple[Node, str]] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    pools: list[Pool] = field(default_factory=list)
    token_outputs: bool = False
    shapes: dict = field(default_factory=dict)  # shapes with the real schedule
    reads: set = field(default_factory=set)  # token positions read by index beyond the prefix
    positional: set = field(default_factory=set)  # token-sized tensors not made from tokens
    index_reads: list[Exit] = field(default_factory=list)  # safe reads by position (prefix)


class _Recorder(gu.ShapeRecorder):
    def __init__(self, gm, probe=()):
        super().__init__(gm)
        self.failed: Node | None = None
        self.probe = {}  # keys node -> blocks whose token dimension is checked there
        for b in probe:
            self.probe.setdefault(b.core.keys, []).append(b)
        self.wrong: list = []  # (block, reason)
        if self.probe:  # probing re-evaluates paths from values the interpreter would free
            self.garbage_collect_values = False

    def run_node(self, n):
        try:
            out = super().run_node(n)
        except Exception:
            self.failed = n
            raise
        for b in self.probe.get(n, ()):
            try:
                why = probe_block(self, b, out)
            except Exception:  # the probe could not run: no evidence either way
                why = None
            if why:
                self.wrong.append((b, why))
        return out


def _run(ctx: Context, r, probe=()):
    """Shapes of a run with every merge at ``r`` (None: as set), the failure, probe reasons."""
    rec = _Recorder(ctx.gm, probe)
    runs = contextlib.nullcontext() if r is None else gu.merges_at(ctx.gm, r, ctx.merges)
    try:
        with runs, torch.no_grad():
            gu.run_interpreter(rec, ctx.gm, ctx.args, ctx.kwargs)
    except Exception as exc:
        return rec.shapes, (rec.failed, exc), []
    # reported at the block's MLP add, so that the block's own merge counts as upstream
    return rec.shapes, None, [(b.mlp_add, why) for b, why in rec.wrong]


def _fixed_table(node: Node, shapes_a: dict, shapes_b: dict, dep: set) -> str | None:
    """Reason a node failed on merged tokens if it combines them with a fixed table (a tensor
    that does not depend on the input and spans the original token count: rotary or position
    embedding, position bias), else None. Other input-independent tensors (an attention pool's
    learned query) are no position table."""
    inputs = node.all_input_nodes if node is not None else ()
    tokens = {shapes_a[i][d] for i in inputs if i in shapes_a
              for d in gu.token_dims(shapes_a.get(i), shapes_b.get(i)) if d != "nested"}
    for i in inputs:
        s = shapes_a.get(i)
        if (i not in dep and gu.is_tensor_shape(s) and sum(d > 1 for d in s) >= 2
                and tokens & set(s)):
            return (f"{node.name} combines merged tokens with {i.name}, a fixed {list(s)} "
                    "table that does not depend on the input (rotary or position embedding, "
                    "position bias): merged tokens have no single position")
    return None


def check_token_flow(ctx: Context) -> Flow:
    """Classify every consumer of merged tokens. Merging blocks get their token dimension
    probed (``token_probe``)."""
    gm = ctx.gm
    flow = Flow()
    merging = {s.block for s in ctx.sites}
    probe = [b for b in ctx.matches.blocks if b.index in merging]
    shapes_a, err_a, wrong = _run(ctx, 0, probe)
    flow.unsafe.extend(wrong)
    shapes_b, err_b, _ = _run(ctx, 1)
    shapes_real, err_real, _ = _run(ctx, None)
    flow.shapes = shapes_real
    dep = gu.data_dependent(gm, shapes_a)
    failed = next((err for err in (err_a, err_b, err_real) if err is not None), None)
    if failed is not None:
        node, exc = failed
        if failed is err_a:  # nothing merged: the rewrite itself does not fit, no table is why
            flow.unsafe.append((node, f"fails with every merge at r=0: {one_line(exc)}"))
            return flow
        merged = shapes_b if failed is err_b else shapes_real  # the failed run's shapes
        flow.unsafe.append((node, _fixed_table(node, shapes_a, merged, dep) or _gather(node)
                            or f"fails on merged tokens: {one_line(exc)}"))
    _classify_all(ctx, flow, shapes_a, shapes_b, dep, None if failed is None else failed[0])
    return flow


def _classify_all(ctx: Context, flow: Flow, shapes_a, shapes_b, dep, failed) -> None:
    """The body of ``check_token_flow``; with the run at r=1 ``failed`` at a node, up to that
    node, which becomes an exit (``Exit``) if it is a layout op on merged tokens."""
    gm, prefix = ctx.gm, ctx.matches.prefix
    core_nodes = set().union(*(c.nodes for c in ctx.matches.cores))
    tdims = {n: gu.token_dims(shapes_a.get(n), shapes_b.get(n)) for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        # Token-sized but not computed from the input: built from the token count (arange,
        # a table sliced to x.shape[1], a causal mask): positions, which merging changes.
        if (tdims[n] and n not in dep and n.op != "placeholder"
                and not n.meta.get("tome", {}).get("inserted")):
            if not any(i in flow.positional for i in n.all_input_nodes):  # report the origin
                flow.unsafe.append((n, f"{n.name} is built from the token count, not from the "
                                       "tokens (a position index, position table or mask); "
                                       "merged tokens have no single position"))
            flow.positional.add(n)
    for core in ctx.matches.cores:  # a cross-attention takes merged tokens as keys, never queries
        local = core.anchor.meta.get("tome", {}).get("local")  # unmerged after it (ToMeSD)
        if core.cross and tdims.get(core.query) and not local:
            flow.unsafe.append((core.anchor, f"the queries of cross-attention {core.anchor.name} "
                                             "carry merged tokens"))
    size_of: dict[Node, Node] = {s.x: s.size for s in ctx.sites}
    offset: dict[Node, int] = {s.x: 0 for s in ctx.sites}
    for s in ctx.sites:  # a merge's token origins (side tensors follow them) align with its sizes
        for u in s.merge.users:
            if u.target is operator.getitem and u.args[1] == 2:
                size_of[u], offset[u] = s.size, 0

    for n in gm.graph.nodes:
        token_inputs = [i for i in n.all_input_nodes if tdims.get(i)]
        if n is failed:  # the run at r=1 stopped here: nothing after it was seen
            if token_inputs:
                _fold_exit(flow, n, token_inputs[0], tdims, offset,
                           f"{n.name} folds the tokens into a grid")
            return
        if not token_inputs or n.op == "placeholder":
            continue
        # follow the size of the merged stream, not of a side tensor gathered to its layout
        src = next((i for i in token_inputs if size_of.get(i) is not None), token_inputs[0])
        if n not in size_of:
            size_of[n] = size_of.get(src)
            offset[n] = offset.get(src, 0)
        tag = n.meta.get("tome", {})
        if tag.get("inserted") or n in core_nodes:
            continue
        if n.op == "output":
            flow.token_outputs = True
            flow.exits += [Exit(n, i, tdims[i][0], offset.get(i, 0),
                                "an output with a token dimension")
                           for i in token_inputs if len(tdims[i]) == 1]
            continue
        reason = classify(gm, n, src, tdims, shapes_a, prefix, flow, size_of, offset)
        if not reason and _reads_positions(n, src, tdims, shapes_a):
            flow.index_reads.append(Exit(n, src, tdims[src][0], offset.get(src, 0),
                                         "a read by position, which left padding moves"))
        if reason:
            flow.unsafe.append((n, reason))
            _fold_exit(flow, n, src, tdims, offset, reason)


def _reads_positions(n: Node, src: Node, tdims, shapes) -> bool:
    """Whether index op ``n`` picks tokens of ``src`` by position (not a full slice)."""
    if not gu.is_index(n) or tdims[src] == ("nested",) or len(tdims[src]) != 1:
        return False
    entry = gu.index_entry(n, shapes.get(src), tdims[src][0])
    return not (isinstance(entry, slice) and entry.start in (None, 0) and entry.stop is None)


def _fold_exit(flow: Flow, n: Node, src: Node, tdims, offset, why: str) -> None:
    """A layout op that folds ``src``'s one token dimension is an exit (``Exit``)."""
    if gu.is_call(n, _LAYOUT_FUNCS, _LAYOUT_METHODS) and len(tdims[src]) == 1:
        flow.exits.append(Exit(n, src, tdims[src][0], offset.get(src, 0), why))


def classify(gm, n, src, tdims, shapes, prefix, flow, size_of, offset) -> str | None:
    """None if ``n`` is safe on merged tokens, else the reason it is not."""
    tin = tdims[src]
    in_shape = shapes.get(src)
    if tin == ("nested",):
        # a tuple of tensors: only unpacking by position is expected
        if n.op == "call_function" and n.target is operator.getitem:
            return None
        return f"unsupported use of a tuple holding merged tokens ({n.name})"
    ndim = len(in_shape)
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))

    if n.op == "call_module":
        mod = gu.module_of(gm, n)
        if isinstance(mod, _ACTIVATIONS):
            return None
        if isinstance(mod, _CHANNEL_MODULES):
            return None if ndim - 1 not in tin else f"{type(mod).__name__} mixes merged tokens"
        return f"module {type(mod).__name__} ({n.target}) applied to merged tokens"

    if n.op == "call_function" and n.target is getattr:
        return None
    if gu.is_meta(n):
        return None
    if gu.is_call(n, _ELEMENTWISE_FUNCS, _ELEMENTWISE_METHODS):
        return None
    if gu.is_call(n, _CHANNEL_FUNCS):
        return None if ndim - 1 not in tin else f"{name} mixes merged tokens"
    if gu.is_call(n, _LAYOUT_FUNCS, _LAYOUT_METHODS):
        out = tdims.get(n)
        outs = shapes.get(n)
        if gu.is_tensor_shape(outs):
            ok = len(out) == 1 and outs[out[0]] == in_shape[tin[0]] and len(tin) == 1
        else:
            ok = out == ("nested",) and all(
                gu.is_tensor_shape(o) and in_shape[tin[0]] in o for o in outs
            )
        return None if ok else f"{name} folds or splits the token dimension ({n.name})"
    if gu.is_index(n) and (n.target is operator.getitem or n.args[0] is src):
        return _check_index(n, src, in_shape, tin, prefix, offset, flow.reads)
    if gu.is_call(n, {torch.mean, torch.sum, _A.mean, _A.sum}, ("mean", "sum")):
        dim = gu.arg(n, 1, "dim", None)
        dims = tuple(range(ndim)) if dim is None else (dim if isinstance(dim, (tuple, list)) else (dim,))
        dims = tuple(d % ndim for d in dims)
        if not set(dims) & set(tin):
            return None
        kind = "sum" if n.target in (torch.sum, "sum") or gu.packet(n) is _A.sum else "mean"
        if len(dims) != 1 or size_of.get(n) is None:
            return f"{kind} over the token dimension together with others ({n.name})"
        if n.kwargs.get("dtype") is not None or len(n.args) > 3:
            return f"{kind} over merged tokens with extra arguments ({n.name})"
        flow.pools.append(Pool(n, dims[0], size_of[n], offset[n], kind))
        return None
    if gu.is_call(n, _EXTREMES, ("max", "min", "amax", "amin", "argmax", "argmin", "logsumexp")):
        return (f"{name} over merged tokens has no size-weighted form: a merged token stands "
                f"for several ({n.name})")
    if gu.is_call(n, gu.CAT):
        dim = gu.arg(n, 1, "dim", 0) % ndim
        return None if dim not in tin else f"concatenation along the token dimension ({n.name})"
    if gu.is_matmul(n):
        a, b = n.args[0], n.args[1]
        if tdims.get(a) and (len(shapes[a]) - 1) in tdims[a]:
            return f"matmul contracts merged tokens ({n.name})"
        if tdims.get(b) and (len(shapes[b]) - 2) in tdims[b]:
            return f"matmul contracts merged tokens ({n.name})"
        return None
    if gu.is_call(n, {_A.index}):
        return _gather(n) or f"advanced indexing over merged tokens ({n.name})"
    return f"unsupported op {name} on merged tokens ({n.name})"


def _gather(n: Node) -> str | None:
    """Why reading merged tokens at positions computed from the input is wrong, naming how the
    positions are computed (CLIP's text pooler: the end-of-sequence token, by argmax); None
    if ``n`` is no such read (an index by tensors)."""
    idx = n.args[1] if len(n.args) > 1 else ()
    idx = [i for i in (idx if isinstance(idx, (list, tuple)) else (idx,)) if isinstance(i, Node)]
    if not idx or not (gu.is_call(n, {_A.index}) or n.target is operator.getitem):
        return None
    found = [a for i in idx for a in gu.ancestors_within(i, 20) if gu.is_call(a, _ARGS, _ARGS_M)]
    how = "positions computed from the input"
    if found:
        src = found[0]
        for _ in range(20):  # back along the data argument (a cast, ``== eos``, a view)
            if src.op == "placeholder" or not src.args or not isinstance(src.args[0], Node):
                break
            src = src.args[0]
        how = f"the {found[0].name} of {src.name} (a pooler reading the end-of-sequence token)"
    return f"gathers tokens at {how} ({n.name}); merging moves the token it reads"


def _check_index(n, src, in_shape, tin, prefix, offset, reads: set) -> str | None:
    """Reads by position are safe inside the protected prefix; positions read beyond it are
    collected in ``reads`` so the caller can grow the prefix over them."""
    if len(tin) != 1:
        return f"indexing a tensor with several token dimensions ({n.name})"
    entry = gu.index_entry(n, in_shape, tin[0])
    base = offset.get(src, 0)
    if isinstance(entry, int):
        if 0 <= entry and base + entry < prefix:
            return None
        if 0 <= entry:
            reads.add(base + entry)
        last = ", the last one (a pooler reading the last token)" if entry == -1 else ""
        return f"reads token {entry} by position{last}, which merging moves ({n.name})"
    if isinstance(entry, slice):
        start = 0 if entry.start is None else entry.start
        if entry.step not in (None, 1) or not isinstance(start, int) or start < 0:
            return f"strided or dynamic token slice ({n.name})"
        if entry.stop is None:
            if base + start > prefix:
                reads.update(range(base + start))
                return f"slice x[{start}:] drops tokens that merging moves ({n.name})"
            offset[n] = base + start
            return None
        if isinstance(entry.stop, int) and 0 <= entry.stop and base + entry.stop <= prefix:
            return None
        if isinstance(entry.stop, int) and 0 <= entry.stop and start == 0:
            reads.update(range(base + entry.stop))
        return f"slice [{entry.start}:{entry.stop}] selects tokens by position ({n.name})"
    return _gather(n) or f"advanced indexing over merged tokens ({n.name})"
