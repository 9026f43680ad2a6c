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

Each token stream (``Block.stream``: a tower of CLIP or SigLIP) is followed on its own, with its
own token-aligned inputs and the masks of its own attention: the text's padding never groups
the image tokens, even where both towers have as many tokens. A side tensor is not followed into
a graph output (the caller gets it as it was).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import graph as gu
from ..kernels.tokens import follow_tokens, key_padding, token_groups
from .base import Context, PassResult, finish, inserted

Node = fx.Node


@dataclass
class Followed:
    unsafe: list[tuple[Node, str]] = field(default_factory=list)
    blame: dict = field(default_factory=dict)  # unsafe node -> the blocks of its stream


def _value_inputs(n: Node) -> list[Node]:
    if gu.is_meta(n):
        return []
    if gu.is_call(n, set(), ("to", "type_as")):  # x.to(other) reads other's dtype only
        first = n.args[0] if n.args else None
        return [first] if isinstance(first, Node) else []
    return list(n.all_input_nodes)


def _value_descendants(starts) -> set[Node]:
    return set(starts) | gu.descendants(starts, through=lambda u, n: n in _value_inputs(u))


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


def _equivariance(ctx: Context, sources, checks) -> dict[Node, str]:
    """Run at r=0 with and without the token-aligned ``sources`` permuted along the tokens;
    ``checks``: node -> token dims. Returns node -> reason for those that do not permute along."""
    gm = ctx.gm
    try:
        with gu.merges_at(gm, 0, ctx.merges):
            values = gu.placeholder_values(gm, ctx.args, ctx.kwargs)
            base = gu.record_values(gm, values, checks)
            index = {p: i for i, p in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
            b, n = values[index[sources[0]]].shape[:2]
            gen = torch.Generator().manual_seed(0)
            perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(b)])
            permuted = list(values)
            for p in sources:
                t = values[index[p]]
                permuted[index[p]] = follow_tokens(t, perm.to(t.device),
                                                   (t.dim() - 1,) if t.dim() > 2 else (1,))
            moved = gu.record_values(gm, permuted, checks)
    except Exception as exc:  # noqa: BLE001 - reported as a reason, never raised
        return {node: f"cannot evaluate the mask ({type(exc).__name__})" for node in checks}
    bad = {}
    for node, dims in checks.items():
        want = follow_tokens(base[node], perm.to(base[node].device), dims)
        got = moved[node]
        if want.shape == got.shape and _close(want, got):
            continue
        if _causal(base[node]):
            bad[node] = (f"causal attention: {node.name} is not a per-token function of the "
                         "padding mask: each token sees only itself and earlier tokens, and a "
                         "merged token would mix future positions")
        else:
            bad[node] = (f"{node.name} is not a per-token function of the padding mask "
                         "(a causal, windowed or positional pattern cannot follow merged tokens)")
    return bad


def _causal(mask) -> bool:
    """A [..., N, N] mask that is one value above the diagonal and another somewhere on it:
    each query sees no later key (whichever value blocks: bool or additive)."""
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2] or mask.shape[-1] < 2:
        return False
    n = mask.shape[-1]
    upper = mask[..., torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)]
    blocked = upper.flatten()[0]
    return bool((upper == blocked).all()) and bool((mask.diagonal(0, -2, -1) != blocked).any())


def _close(a, b) -> bool:
    if a.dtype == torch.bool or not a.is_floating_point():
        return torch.equal(a, b)
    return torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def _padding(graph: fx.Graph, core, side: set) -> Node | None:
    """A node holding which original tokens are padding ([B, N] bool), read off the first
    attention's mask, which sees the original token layout (None: no padding mask there)."""
    mask, fill = core.mask, None
    if not isinstance(mask, Node) or mask not in side:
        return None
    if core.kind == "softmax" and gu.is_masked_fill(core.logits):
        fill = core.logits.args[2] if len(core.logits.args) > 2 else None
        if not isinstance(fill, (int, float)):
            return None
    elif core.kind == "softmax" and not gu.is_add(core.logits):
        return None
    with graph.inserting_after(mask):
        return inserted(graph.call_function(key_padding, (mask, fill)), "padding")


def follow_side_tensors(ctx: Context) -> PassResult:
    """Make the merges group-aware and re-index side tensors where they meet merged tokens,
    in each token stream (two towers: each its own tokens and padding mask)."""
    info, count = Followed(), 0
    stream = {b.index: b.stream for b in ctx.matches.blocks}
    first = {}  # stream -> its first block
    for b in ctx.matches.blocks:
        first.setdefault(b.stream, b)
    streams: dict[int, list] = {}
    for s in ctx.sites:
        streams.setdefault(stream[s.block], []).append(s)
    for head, sites in streams.items():
        unsafe = len(info.unsafe)
        count += _follow(ctx, first[head], [s.merge for s in sites], info)
        for node, _ in info.unsafe[unsafe:]:  # the whole stream: its tokens are ordered
            info.blame[node] = [s.block for s in sites]
    return PassResult(finish(ctx.gm) if count else ctx.gm, count, info)


def _follow(ctx: Context, b0, merges: list[Node], info: Followed) -> int:
    """``follow_side_tensors`` for one stream: its first block ``b0``, its ``merges``. Appends
    to ``info.unsafe``; returns how many side tensors were re-indexed."""
    gm, shapes, shape, start = ctx.gm, ctx.shapes, ctx.shapes[b0.merge_at], len(info.unsafe)
    batch, tokens = shape[1 - b0.token_dim], shape[b0.token_dim]
    graph = gm.graph
    after = gu.descendants(merges)
    aligned = [p for p in graph.nodes if p.op == "placeholder"
               and gu.is_tensor_shape(shapes.get(p)) and shapes[p][0] == batch
               and len(shapes[p]) >= 2 and shapes[p][-1] == tokens
               and all(d == 1 for d in shapes[p][1:-1])]
    if not aligned:
        return 0
    side = _value_descendants(aligned) - after
    # the masks of this stream's attention (another tower's mask is no concern of its merges)
    own = {b.core.anchor for b in ctx.matches.blocks if b.stream == b0.stream}
    masks = [gu.arg(c.anchor, 3, "attn_mask", None) if c.kind == "sdpa" else c.mask
             for c in ctx.matches.cores if c.anchor in own or c.keys in after]
    mask_nodes = [m for m in masks if isinstance(m, Node) and m in side]

    edges = []  # (consumer, side tensor, token dims)
    for n in graph.nodes:  # an output returns a side tensor as it is (another tower's tokens)
        if n not in after or n.op == "output" or n.meta.get("tome", {}).get("inserted"):
            continue
        for i in _value_inputs(n):
            if i in side:
                dims = _token_dims(shapes.get(i), batch, tokens)
                if dims:
                    edges.append((n, i, dims))
    if not edges and not mask_nodes:
        return 0

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
    bad = _equivariance(ctx, sorted(sources, key=lambda p: p.name),
                        {t: d for t, d in checks.items() if d})
    for t, why in bad.items():
        info.unsafe.append((t, why))
    if len(info.unsafe) > start:
        return 0

    # group-aware merges that also return the origin of each token
    last_ph = [p for p in graph.nodes if p.op == "placeholder"][-1]
    ordered = [p for p in aligned if p in sources]
    with graph.inserting_after(last_ph):
        groups = inserted(graph.call_function(token_groups, tuple(ordered)), "groups")
    pad = _padding(graph, b0.core, side)
    origin = None
    origins = []
    for m in merges:
        gu.set_merge_arg(m, "origin", origin)
        gu.set_merge_arg(m, "groups", groups)
        if gu.takes_arg(m, "pad"):
            gu.set_merge_arg(m, "pad", pad)
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
                    graph.call_function(follow_tokens, (t, before[-1], dims)), "follow")
        n.replace_input_with(t, made[key])
    return len(made)
