"""Token-aligned side tensors follow the merges (attention masks, pooling masks).

A padding mask enters as a model input shaped [batch, tokens] (HF ``attention_mask``,
``src_key_padding_mask``). Everything computed from it (the 4-D additive mask, ``m[..., None]``
for masked pooling) keeps the *original* token layout, so where such a side tensor meets the
merged token stream it must be re-indexed by the same merges. Design:

- the merges get ``groups`` (the token-aligned inputs, one vector per original token): tokens
  merge only with tokens of equal group (padding never merges into real tokens, pad may merge
  with pad), so every merged token has a well-defined mask value;
- each merge also returns ``origin``: for each output token one original token of its group;
- every edge from a side tensor into a node downstream of a merge gets
  ``follow_tokens(side, origin, dims)``, gathering its token dims.

Gathering is exact only if the side tensor is a per-token function of the token-aligned inputs
(plus per-sequence totals such as ``m.sum(1)``). That is checked by running the graph once more
with the token-aligned inputs permuted along the tokens: each side tensor must permute the same
way (a causal, windowed or positional pattern does not). Failures are returned as unsafe nodes
with a reason, and the caller switches the merges upstream of them off.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import graph_utils as gu
from .. import ops
from .base import PassResult, finish, inserted

Node = fx.Node

_META_METHODS = {"size", "dim", "numel", "__len__", "get_device"}
_aten = torch.ops.aten
_META_ATEN = {_aten.sym_size, _aten.sym_numel, _aten.sym_stride, _aten._assert_tensor_metadata}


@dataclass
class Followed:
    unsafe: list[tuple[Node, str]] = field(default_factory=list)
    groups: Node | None = None
    follows: list[Node] = field(default_factory=list)


def _is_meta(n: Node) -> bool:
    """Reads only metadata (shape, dtype, device) of its input, not values."""
    if n.op == "call_function" and (n.target is getattr
                                    or getattr(n.target, "overloadpacket", None) in _META_ATEN):
        return True
    return gu.is_call(n, set(), _META_METHODS)


def _value_inputs(n: Node) -> list[Node]:
    if _is_meta(n):
        return []
    if gu.is_call(n, set(), ("to", "type_as")):  # x.to(other) reads other's dtype only
        first = n.args[0] if n.args else None
        return [first] if isinstance(first, Node) else []
    return list(n.all_input_nodes)


def _descendants(starts) -> set[Node]:
    seen, stack = set(), list(starts)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _value_descendants(starts) -> set[Node]:
    seen, stack = set(starts), list(starts)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in seen and n in _value_inputs(u):
                seen.add(u)
                stack.append(u)
    return seen


def _value_ancestors(node: Node) -> set[Node]:
    seen, stack = {node}, [node]
    while stack:
        for i in _value_inputs(stack.pop()):
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def _token_dims(shape, batch: int, tokens: int):
    if not gu.is_tensor_shape(shape) or len(shape) < 2 or shape[0] not in (batch, 1):
        return ()
    return tuple(d for d in range(1, len(shape)) if shape[d] == tokens)


def _placeholder_values(gm, args, kwargs) -> dict[Node, object]:
    out, i = {}, 0
    for p in gm.graph.nodes:
        if p.op != "placeholder":
            continue
        if i < len(args):
            out[p] = args[i]
            i += 1
        elif p.target in kwargs:
            out[p] = kwargs[p.target]
        else:
            out[p] = p.args[0] if p.args else None
    return out


class _Grab(fx.Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def _grab(gm, values: dict, wanted) -> dict:
    g = _Grab(gm, set(wanted))
    with torch.no_grad():
        g.run(*[values[p] for p in gm.graph.nodes if p.op == "placeholder"])
    return g.values


def _equivariance(gm, args, kwargs, merges, sources, checks) -> dict[Node, str]:
    """Run at r=0 with and without the token-aligned ``sources`` permuted along the tokens;
    ``checks``: node -> token dims. Returns node -> reason for those that do not permute along."""
    saved = [m.args[3] for m in merges]
    for m in merges:
        m.update_arg(3, 0)
    gm.recompile()
    try:
        values = _placeholder_values(gm, args, kwargs)
        base = _grab(gm, values, checks)
        b, n = next(values[p].shape[:2] for p in sources)
        gen = torch.Generator().manual_seed(0)
        perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(b)])
        permuted = dict(values)
        for p in sources:
            t = values[p]
            permuted[p] = ops.follow_tokens(t, perm.to(t.device), (t.dim() - 1,) if t.dim() > 2 else (1,))
        moved = _grab(gm, permuted, checks)
    except Exception as exc:  # noqa: BLE001 - reported as a reason, never raised
        return {node: f"cannot evaluate the mask ({type(exc).__name__})" for node in checks}
    finally:
        for m, r in zip(merges, saved):
            m.update_arg(3, r)
        gm.recompile()
    bad = {}
    for node, dims in checks.items():
        want = ops.follow_tokens(base[node], perm.to(base[node].device), dims)
        got = moved[node]
        if want.shape != got.shape or not _close(want, got):
            bad[node] = (f"{node.name} is not a per-token function of the padding mask "
                         "(a causal, windowed or positional pattern cannot follow merged tokens)")
    return bad


def _close(a, b) -> bool:
    if a.dtype == torch.bool or not a.is_floating_point():
        return torch.equal(a, b)
    return torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def follow_side_tensors(gm: fx.GraphModule, sites, cores, shapes: dict, args, kwargs,
                        batch: int, tokens: int) -> PassResult:
    """Make the merges group-aware and re-index side tensors where they meet merged tokens."""
    info = Followed()
    if not sites:
        return PassResult(gm, 0, info)
    graph = gm.graph
    merges = [s.merge for s in sites]
    after = _descendants(merges)
    aligned = [p for p in graph.nodes if p.op == "placeholder"
               and gu.is_tensor_shape(shapes.get(p)) and shapes[p][0] == batch
               and len(shapes[p]) >= 2 and shapes[p][-1] == tokens
               and all(d == 1 for d in shapes[p][1:-1])]
    if not aligned:
        return PassResult(gm, 0, info)
    side = _value_descendants(aligned) - after
    masks = [gu.arg(c.anchor, 3, "attn_mask", None) if c.kind == "sdpa" else c.mask for c in cores]
    mask_nodes = [m for m in masks if isinstance(m, Node) and m in side]

    edges = []  # (consumer, side tensor, token dims)
    for n in graph.nodes:
        if n not in after or n.meta.get("tome", {}).get("inserted"):
            continue
        for i in _value_inputs(n):
            if i in side:
                dims = _token_dims(shapes.get(i), batch, tokens)
                if dims:
                    edges.append((n, i, dims))
    if not edges and not mask_nodes:
        return PassResult(gm, 0, info)

    # which token-aligned inputs define the groups; fixed tensors indexed by position are refused
    sources: set[Node] = set()
    checks: dict[Node, tuple] = {}
    for n, t, dims in edges:
        checks[t] = dims
    for m in mask_nodes:
        checks.setdefault(m, _token_dims(shapes.get(m), batch, tokens))
    for t in checks:
        anc = _value_ancestors(t)
        sources |= {a for a in anc if a in aligned}
        fixed = [a for a in anc if a.op == "get_attr" and _token_dims(shapes.get(a), 1, tokens)]
        if fixed:
            info.unsafe.append((t, f"{t.name} mixes in {fixed[0].target}, a fixed "
                                "tensor indexed by token position"))
    bad = _equivariance(gm, args, kwargs, merges, sorted(sources, key=lambda p: p.name),
                        {t: d for t, d in checks.items() if d})
    for t, why in bad.items():
        info.unsafe.append((t, why))
    if info.unsafe:
        return PassResult(gm, 0, info)

    # group-aware merges that also return the origin of each token
    last_ph = [p for p in graph.nodes if p.op == "placeholder"][-1]
    ordered = [p for p in aligned if p in sources]
    with graph.inserting_after(last_ph):
        info.groups = inserted(graph.call_function(ops.token_groups, tuple(ordered)), "groups")
    origin = None
    origins = []
    for m in merges:
        m.args = (*m.args[:6], origin, info.groups)
        with graph.inserting_after(m):
            origin = inserted(graph.call_function(operator.getitem, (m, 2)), "origin")
        origins.append(origin)
    order = {n: i for i, n in enumerate(graph.nodes)}
    made: dict[tuple, Node] = {}
    for n, t, dims in edges:
        before = [o for o in origins if order[o] < order[n]]
        if not before:
            continue
        key = (t, before[-1], dims)
        if key not in made:
            with graph.inserting_before(n):
                made[key] = inserted(
                    graph.call_function(ops.follow_tokens, (t, before[-1], dims)), "follow")
        n.replace_input_with(t, made[key])
    info.follows = list(made.values())
    return PassResult(finish(gm), len(made), info)
