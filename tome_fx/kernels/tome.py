"""ToMe's kernel: bipartite soft matching and the size-weighted merge.

Pure functions of tensors, usable without any graph. The rewritten graph calls ``tome_merge`` by
name (``call_function``), so ``print(gm.code)`` reads like the algorithm. Token layout is
``[batch, tokens, channels]``; sizes are ``[batch, tokens, 1]`` float32.

The tokens after the ``prefix`` protected ones alternate between set A (even absolute
positions) and set B (odd); ``split_ab`` is that split, for every user of it (matching, merge
layout, origins, source tracking, the cost model).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .tokens import current_groups, identity_origin, ones_size


def split_ab(t: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sets A and B of ``t``'s tokens (dim 1) after the ``prefix`` protected ones (views)."""
    rest, off = t[:, prefix:], prefix % 2
    return rest[:, off::2], rest[:, 1 - off :: 2]


def ab_sizes(n_tokens: int, prefix: int) -> tuple[int, int]:
    """(|A|, |B|) for ``n_tokens`` tokens with ``prefix`` protected."""
    rest, off = torch.sym_max(n_tokens - prefix, 0), prefix % 2
    return (rest + 1 - off) // 2, (rest + off) // 2  # arithmetic: symbolic counts stay symbolic


def merged_layout(t: torch.Tensor, prefix: int, unm: torch.Tensor) -> list[torch.Tensor]:
    """The parts of a merge's output layout taken from ``t`` [B, N, ...]: the protected prefix,
    the unmerged A tokens (``unm``), the B tokens (merged A tokens are added to them)."""
    a, b = split_ab(t, prefix)
    index = unm.reshape(*unm.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return [t[:, :prefix], a.gather(1, index), b]


@fx.wrap
def keys_metric(keys: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Attention keys averaged over heads: [B, H, N, d] (or [B, H, d, N] if transposed) -> [B, N, d]."""
    if transposed:
        keys = keys.transpose(-1, -2)
    if keys.dim() == 4:
        keys = keys.mean(dim=1)
    return keys


def bipartite_match(metric: torch.Tensor, r: int, prefix: int, groups: torch.Tensor | None = None):
    """ToMe bipartite soft matching over the tokens after ``prefix`` protected ones.

    Set A is the tokens at even absolute positions, set B at odd ones. Each A token proposes its
    most similar B token (cosine similarity); the ``r`` best proposals are merged.
    ``groups`` [B, N, K] (optional): tokens may only merge with tokens of equal group vector
    (padding never merges into real tokens); ``r`` then shrinks to the pairs that exist.
    Returns (unmerged A indices sorted ascending, merged A indices, their B partners).
    """
    with torch.no_grad():
        m = metric.float()
        a, b = split_ab(m / m.norm(dim=-1, keepdim=True), prefix)
        scores = a @ b.transpose(-1, -2)
        if groups is not None:
            ga, gb = split_ab(groups, prefix)
            differ = (ga[:, :, None, :] != gb[:, None, :, :]).any(dim=-1)
            scores = scores.masked_fill(differ, float("-inf"))
        best, partner = scores.max(dim=-1)
        if groups is not None:  # data-dependent: only A tokens with a same-group partner merge
            r = torch.sym_min(r, (best > float("-inf")).sum(dim=-1).min().item())
        order = best.argsort(dim=-1, descending=True)
        src = order[:, :r]
        unm = order[:, r:].sort(dim=-1).values
        dst = partner.gather(-1, src)
    return unm, src, dst


def merge_limit(n_tokens: int, prefix: int) -> int:
    """Largest r a block with ``n_tokens`` tokens and ``prefix`` protected ones can merge."""
    return torch.sym_max(n_tokens - prefix, 0) // 2


def merge_count(r, n_tokens: int, prefix: int, start=None):
    """How many tokens a merge of ``n_tokens`` asks to take away (``match_tokens`` clamps it).

    ``r`` is ToMe's r (an int), or ``(kept, of)``: a share that scales with the token count.
    ``start`` is the count that entered the first merge (None: this merge is the first). After
    the merge ``kept / of * start`` tokens remain, rounded with halves down (the larger merge
    keeps the FLOP budget), at least the ``prefix``. Rounding what remains, not each block's r,
    keeps every block within half a token of its share at any length, and ``start == of``
    gives exactly ``kept``. Integer arithmetic only: symbolic sizes (torch.export,
    torch.compile's dynamic shapes) stay symbolic.
    """
    if not isinstance(r, tuple):
        return r
    kept, of = r
    total = n_tokens if start is None else start
    return n_tokens - torch.sym_max((total * kept + (of - 1) // 2) // of, prefix)


def match_tokens(n_tokens: int, keys, r: int, prefix: int, keys_transposed: bool = False,
                 origin=None, groups=None, start=None):
    """The matching ``tome_merge`` applies to ``n_tokens`` tokens (``bipartite_match``'s
    indices), or None where it merges nothing. ``r``/``start``: see ``merge_count``;
    ``origin``/``groups``: see ``tome_merge``."""
    r = torch.sym_min(merge_count(r, n_tokens, prefix, start), merge_limit(n_tokens, prefix))
    if isinstance(r, int) and r <= 0:  # a symbolic count (torch.compile) takes no branch
        return None
    current = None if groups is None else current_groups(groups, origin, keys.shape[0], n_tokens)
    return bipartite_match(keys_metric(keys, keys_transposed), r, prefix, current)


def merge_where(n_tokens: int, prefix: int, unm, src, dst) -> torch.Tensor:
    """[B, n_tokens] int64: the output position of each input token of a merge (a merged A
    token: its B partner's). ``unm``/``src``/``dst``: ``bipartite_match``'s indices. The
    layout is ``merged_layout``'s, applied to the input positions."""
    bsz = unm.shape[0]
    positions = torch.arange(n_tokens, device=unm.device).expand(bsz, n_tokens)
    kept = torch.cat(merged_layout(positions, prefix, unm), dim=1)  # input position per output
    ranks = torch.arange(kept.shape[1], device=unm.device).expand(bsz, -1)
    where = torch.empty(bsz, n_tokens, dtype=torch.long, device=unm.device).scatter_(1, kept, ranks)
    merged = split_ab(positions, prefix)[0].gather(1, src)  # input positions of merged A tokens
    return where.scatter_(1, merged, prefix + unm.shape[1] + dst)


@fx.wrap
def tome_unmerge(x, dim: int, offset: int, *wheres):
    """``x`` with its token dimension ``dim`` back in the original token layout: every original
    token gets a copy of the merged token that holds it (ToMeSD's unmerge). ``wheres``: the
    ``merge_where`` maps of the merges ``x`` went through, in order; ``offset``: ``x`` holds the
    tokens from that position on (``h[:, 1:]`` after a class token, which stays in place).
    Batch first, or ``x`` sequence-first (``dim`` 0)."""
    slots = wheres[0]
    for w in wheres[1:]:
        slots = w.gather(1, slots)
    slots = slots[:, offset:] - offset
    t = x.movedim(dim, 1)
    index = slots.reshape(*slots.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, index).movedim(1, dim)


@fx.wrap
def tome_merge(x, keys, size, r, prefix: int, keys_transposed: bool = False,
               origin=None, groups=None, start=None, where: bool = False):
    """Merge ``r`` token pairs of ``x`` [B, N, C] (size-weighted), matched on ``keys``.

    ``size`` is [B, N, 1] or None (all ones). Returns (merged x, merged size). Output order:
    protected prefix, unmerged A tokens, B tokens, each in previous relative order.
    ``r`` (an int, or ``(kept, of)`` with ``start``): see ``merge_count``.

    With ``groups`` ([B, N0, K], one vector per *original* token, e.g. the attention mask) only
    tokens of equal group merge, and a third output is returned: ``origin`` [B, N'] int64, for
    each output token an original token of its group (``origin`` in: the same for the input
    tokens, None = identity). Token-aligned side tensors follow the merge by gathering it.
    ``where=True`` appends the ``merge_where`` map as the last output (for ``tome_unmerge``).
    """
    n = x.shape[1]
    if size is None:
        size = ones_size(x)
    match = match_tokens(n, keys, r, prefix, keys_transposed, origin, groups, start)
    if where:
        out = _merge(x, size, prefix, match, origin, groups)
        if match is None:
            return (*out, torch.arange(n, device=x.device).repeat(x.shape[0], 1))
        return (*out, merge_where(n, prefix, *match))
    return _merge(x, size, prefix, match, origin, groups)


def _merge(x, size, prefix: int, match, origin, groups):
    """``tome_merge``'s outputs for a matching (None: nothing merges)."""
    n = x.shape[1]
    if groups is None:
        return (x, size) if match is None else merge_by_index(x, size, prefix, *match)
    origin = identity_origin(origin, x.shape[0], n, x.device)
    if match is None:
        return x, size, origin
    new_origin = torch.cat(merged_layout(origin, prefix, match[0]), dim=1)
    return (*merge_by_index(x, size, prefix, *match), new_origin)


def merge_by_index(x, size, prefix: int, unm, src, dst):
    """Apply a matching (indices into sets A and B) to ``x`` [B, N, C] and ``size`` (or None).

    One row gather builds the output layout (prefix, unmerged A, B); each merged B token is then
    moved to the size-weighted mean by adding ``s_a / s_total * (x_a - x_b)`` over its partners,
    which touches only the ``r`` merged rows. Untouched tokens are copied bit-exactly. Flat
    ``index_select``/``index_add_`` are used because they are much cheaper than ``gather`` /
    ``scatter_add`` with channel-expanded indices on CPU.
    """
    bsz, n, c = x.shape
    off = prefix % 2
    a0, b0 = prefix + off, prefix + 1 - off  # absolute positions of the first A and B tokens
    nb = ab_sizes(n, prefix)[1]
    n_out = prefix + unm.shape[1] + nb
    dev = x.device
    batch = torch.arange(bsz, device=dev)[:, None]
    keep = torch.cat([
        torch.arange(prefix, device=dev).expand(bsz, prefix),
        a0 + 2 * unm,
        (b0 + 2 * torch.arange(nb, device=dev)).expand(bsz, nb),
    ], dim=1)
    keep = (keep + batch * n).reshape(-1)
    src_in = (a0 + 2 * src + batch * n).reshape(-1)
    dst_in = (b0 + 2 * dst + batch * n).reshape(-1)
    dst_out = (prefix + unm.shape[1] + dst + batch * n_out).reshape(-1)

    if size is None:
        new_size = torch.ones(bsz * n_out, dtype=torch.float32, device=dev)
        src_size = torch.ones(src_in.shape[0], dtype=torch.float32, device=dev)
    else:
        flat_size = size.reshape(-1)
        new_size = flat_size.index_select(0, keep)
        src_size = flat_size.index_select(0, src_in).float()
        new_size = new_size.float()
    new_size.index_add_(0, dst_out, src_size)
    weight = (src_size / new_size.index_select(0, dst_out))[:, None]

    flat = x.reshape(bsz * n, c)
    out = flat.index_select(0, keep)
    acc = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 rows are combined in fp32
    moved = (flat.index_select(0, src_in).to(acc) - flat.index_select(0, dst_in).to(acc)) * weight
    out = out.index_add(0, dst_out, moved.to(x.dtype))
    out_size = new_size.view(bsz, n_out, 1)
    if size is not None:
        out_size = out_size.to(size.dtype)
    return out.view(bsz, n_out, c), out_size
