"""Proportional attention: add log(size) over keys to every attention whose keys are merged.

Two forms (``optimize(prop_attn=...)``):

* ``"bias"``: ``log(size)`` as SDPA's float ``attn_mask`` (added to a mask already there), or
  added to explicit-softmax logits;
* ``"fold"``: SDPA gets no mask: ``kernels.tokens.fold_size`` appends one channel to queries
  and keys whose product is ``log(size)``, and the output is sliced back; fused kernels that take
  no mask (flash attention) stay available. Explicit-softmax attention, and SDPA that already has
  a mask, get the bias form.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from .. import graph as gu
from ..kernels.tokens import add_attn_bias, fold_size, size_bias
from .base import Context, PassResult, finish, inserted

FORMS = ("bias", "fold")


def prop_attn_form(prop_attn) -> str | None:
    """``optimize``'s ``prop_attn`` as a form name, or None for off; one-line errors."""
    if prop_attn is True:
        return "bias"  # the measured default awaits a GPU (README, "Proportional attention")
    if prop_attn is False or prop_attn is None:
        return None
    if isinstance(prop_attn, str) and prop_attn in FORMS:
        return prop_attn
    raise ValueError(f"prop_attn must be True, False, 'bias' or 'fold', got {prop_attn!r}")


def _latest_site(sites, reach: list, keys: fx.Node):
    """The latest merge whose tokens reach ``keys``; None where no merge's do (the keys of a
    cross-attention over other tokens, such as a UNet's text, are not merged)."""
    before = [s for s, down in zip(sites, reach) if keys in down]
    return before[-1] if before else None


def _keys_size(ctx: Context, site, core) -> fx.Node:
    """The sizes of the tokens ``core``'s keys hold: all of the merge's, or from ``offset`` on
    when the keys read the stream past (part of) its protected prefix (an attention pool over
    ``x[:, prefix:]``: timm's registers with a MAP head). Prefix tokens never merge, so the
    offset is the one of the unmerged graph."""
    blocks = {b.index: b for b in ctx.matches.blocks}
    block = blocks.get(site.block)
    stream = ctx.shapes.get(block.merge_at) if block is not None else None
    offset = stream[block.token_dim] - core.tokens if gu.is_tensor_shape(stream) else 0
    if not 0 < offset <= ctx.matches.prefix:
        # other tokens (pooled between stages): the sizes do not fit, the run fails there and
        # the merges upstream of these keys are switched off (not the ones after them)
        return site.size
    with ctx.gm.graph.inserting_before(core.anchor):
        return inserted(ctx.gm.graph.call_function(
            operator.getitem, (site.size, (slice(None), slice(offset, None)))), "bias")


def fold_into_sdpa(graph: fx.Graph, anchor: fx.Node, size: fx.Node, head_dim: int,
                   v_dim: int) -> None:
    """Rewire an SDPA call to ``fold_size``'s q, k, v and slice its output back."""
    scale = gu.arg(anchor, 6, "scale", None)
    scale = head_dim ** -0.5 if scale is None else scale  # the default, before the head dim grows
    qkv = [gu.arg(anchor, i, name) for i, name in enumerate(("query", "key", "value"))]
    users = list(anchor.users)
    with graph.inserting_before(anchor):
        folded = inserted(graph.call_function(fold_size, (*qkv, size, scale)), "size_fold")
        for i, name in enumerate(("query", "key", "value")):
            part = inserted(graph.call_function(operator.getitem, (folded, i)), "size_fold")
            gu.set_arg(anchor, i, name, part)
    gu.set_arg(anchor, 6, "scale", scale)
    with graph.inserting_after(anchor):
        out = inserted(graph.call_function(operator.getitem,
                                           (anchor, (Ellipsis, slice(0, v_dim)))), "size_fold")
    for u in users:
        u.replace_input_with(anchor, out)


def add_size_bias(ctx: Context, form: str = "bias") -> PassResult:
    """Every attention core whose keys hold merged tokens gets ``log(size)`` of the latest such
    merge's sizes, in ``form`` (see the module docstring). ``info``: how many were folded."""
    graph = ctx.gm.graph
    count = folded = 0
    reach = [gu.descendants([s.merge]) for s in ctx.sites]
    for core in ctx.matches.cores:
        site = _latest_site(ctx.sites, reach, core.keys)
        size = None if site is None else _keys_size(ctx, site, core)
        if size is None:
            continue
        count += 1
        mask = gu.arg(core.anchor, 3, "attn_mask") if core.kind == "sdpa" else None
        if core.kind == "sdpa" and form == "fold" and mask is None:
            fold_into_sdpa(graph, core.anchor, size, ctx.shapes[core.query][-1], ctx.shapes[core.anchor][-1])
            folded += 1
        elif core.kind == "sdpa":
            with graph.inserting_before(core.anchor):
                ndim = len(ctx.shapes[core.query])
                bias = inserted(graph.call_function(size_bias, (size, ndim, core.query)), "bias")
                new = bias
                if mask is not None:
                    new = inserted(graph.call_function(add_attn_bias, (mask, bias)), "bias")
            gu.set_arg(core.anchor, 3, "attn_mask", new)  # where the mask was passed
        else:
            logits = core.logits
            with graph.inserting_before(core.anchor):
                ndim = len(ctx.shapes[logits])
                bias = inserted(graph.call_function(size_bias, (size, ndim, logits)), "bias")
                biased = inserted(graph.call_function(operator.add, (logits, bias)), "bias")
            core.anchor.replace_input_with(logits, biased)
    return PassResult(finish(ctx.gm), count, folded)
