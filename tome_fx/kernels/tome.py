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


@fx.wrap
def keys_metric(keys: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Attention keys averaged over heads: [B, H, N, d] (or [B, H, d, N] if transposed) -> [B, N, d]."""
    if transposed:
        keys = keys.transpose(-1, -2)
    if keys.dim() == 4:
        keys = keys.mean(dim=1)
    return keys


def _similarity(a, b):
    """[B, Na, Nb] products of the A and B tokens. bmm, not @: under torch.export matmul's
    decomposition of the strided A/B views guards on the token count's parity."""
    return torch.bmm(a, b.transpose(1, 2))


def bipartite_match(metric: torch.Tensor, r: int, prefix: int):
    """ToMe bipartite soft matching over the tokens after ``prefix`` protected ones.

    Set A is the tokens at even absolute positions, set B at odd ones. Each A token proposes its
    most similar B token (cosine similarity); the ``r`` best proposals are merged.
    Returns (unmerged A indices sorted ascending, merged A indices, their B partners).
    """
    with torch.no_grad():
        m = metric.float()
        a, b = split_ab(m / m.norm(dim=-1, keepdim=True), prefix)
        best, partner = _similarity(a, b).max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src = order[:, :r]
        unm = order[:, r:].sort(dim=-1).values
        dst = partner.gather(-1, src)
    return unm, src, dst


def bipartite_plan(n_tokens: int, prefix: int, unm, src, dst):
    """``bipartite_match``'s indices as a merge plan ``(keep, src, dst, live)``: ``keep``
    [B, N'] the input position of each output token (protected prefix, unmerged A tokens, B
    tokens), ``src`` [B, R] the input positions of the merged tokens, ``dst`` [B, R] the output
    slot each is added to, ``live`` [B, R] float (None: all 1), a merged token's weight."""
    bsz, dev = unm.shape[0], unm.device
    off = prefix % 2
    a0, b0 = prefix + off, prefix + 1 - off  # absolute positions of the first A and B tokens
    nb = ab_sizes(n_tokens, prefix)[1]
    keep = torch.cat([torch.arange(prefix, device=dev).expand(bsz, prefix), a0 + 2 * unm,
                      (b0 + 2 * torch.arange(nb, device=dev)).expand(bsz, nb)], dim=1)
    return keep, a0 + 2 * src, prefix + unm.shape[1] + dst, None


def merge_limit(n_tokens: int, prefix: int) -> int:
    """Largest r a block with ``n_tokens`` tokens and ``prefix`` protected ones can merge."""
    return torch.sym_max(n_tokens - prefix, 0) // 2


def merge_count(r, n_tokens: int, prefix: int, start=None, min_tokens: int = 0):
    """How many tokens a merge of ``n_tokens`` asks to take away (``match_tokens`` clamps it).

    ``r`` is ToMe's r (an int), or ``(kept, of)``: a share that scales with the token count.
    ``start`` is the count that entered the first merge (None: this merge is the first). After
    the merge ``kept / of * start`` tokens remain, rounded with halves down (the larger merge
    keeps the FLOP budget), at least the ``prefix``. Rounding what remains, not each block's r,
    keeps every block within half a token of its share at any length, and ``start == of``
    gives exactly ``kept``. Integer arithmetic only: symbolic sizes (torch.export,
    torch.compile's dynamic shapes) stay symbolic; ``start`` may also be a tensor of counts,
    one per sample (``padded_plan``).
    ``min_tokens``: the fidelity floor, a merge never leaves fewer tokens than that (``n_tokens``
    may be a tensor of counts too); 0: none. Arithmetic, no branch on sizes.
    """
    if min_tokens:
        asked = merge_count(r, n_tokens, prefix, start)
        if isinstance(n_tokens, torch.Tensor):  # one count per sample
            cap = (n_tokens - min_tokens).clamp(min=0)
            return torch.minimum(asked, cap) if isinstance(asked, torch.Tensor) else \
                cap.clamp(max=asked)
        return torch.sym_min(asked, torch.sym_max(n_tokens - min_tokens, 0))
    if not isinstance(r, tuple):
        return r
    kept, of = r
    total = n_tokens if start is None else start
    remain = (total * kept + (of - 1) // 2) // of
    if isinstance(remain, torch.Tensor):
        return n_tokens - remain.clamp(min=prefix)
    return n_tokens - torch.sym_max(remain, prefix)


def _batch_count(r, n_tokens: int, prefix: int, start, min_tokens: int):
    """The tokens a merge of the batch's ``n_tokens`` takes away: ``merge_count`` within
    ``merge_limit``."""
    return torch.sym_min(merge_count(r, n_tokens, prefix, start, min_tokens),
                         merge_limit(n_tokens, prefix))


def padded_plan(n_tokens: int, metric, r, prefix: int, origin, groups, start, pad,
                min_tokens: int = 0):
    """The merge plan (see ``bipartite_plan``) of a padded batch: each sample is matched and
    merged as it would be alone, with its padding removed.

    ``groups`` [B, N0, K] and ``pad`` [B, N0] bool (padding, or None) are per original token;
    ``origin`` [B, N] the original token of each current token (None: identity). Each sample's
    real tokens are first put before its padding (stable; a no-op for right padding and after
    the first merge, whose output keeps that order), so its A/B split and its protected prefix
    (its first real tokens) are the ones it has alone.
    Its r follows its own real token count (``merge_count`` with its own start count and the
    ``min_tokens`` floor on its own real tokens), at most its same-group pairs. The batch keeps
    the token count the schedule gives the padded length (the longest sample's, so the FLOPs
    are the batch's as before); a sample's own padding
    fills the slots its real tokens leave. Output per sample: prefix, unmerged real A tokens,
    real B tokens, padding; padding beyond the slots is merged into the last padding slot, or
    dropped where none is left (a left-padded sample keeps one: its slot 0 is read by position).
    """
    bsz, dev = metric.shape[0], metric.device
    origin = identity_origin(origin, bsz, n_tokens, dev)
    pos = torch.arange(n_tokens, device=dev)
    cur = torch.zeros(bsz, n_tokens, dtype=torch.bool, device=dev) if pad is None else \
        pad.expand(bsz, -1).gather(1, origin)
    # unique sort keys instead of a stable sort (ONNX has none); the protected prefix is the
    # sample's first real tokens, as alone (left padding moves them forward)
    perm = (cur.long() * n_tokens + pos).argsort(dim=1)
    with torch.no_grad():
        m = metric.float()
        m = (m / m.norm(dim=-1, keepdim=True)).gather(1, perm[..., None].expand_as(m))
        g = current_groups(groups, origin.gather(1, perm), bsz, n_tokens)
        cur = cur.gather(1, perm)
        (a, b), (ga, gb), (pa, pb) = (split_ab(t, prefix) for t in (m, g, cur))
        forbid = (ga[:, :, None, :] != gb[:, None, :, :]).any(-1) | pa[..., None] | pb[:, None]
        best, partner = _similarity(a, b).masked_fill(forbid, float("-inf")).max(-1)
        r_i, n_out = _sample_counts(n_tokens, r, prefix, start, pad, (~cur).sum(1), best,
                                    min_tokens)
        rank = torch.empty_like(partner).scatter_(
            1, best.argsort(dim=1, descending=True),
            torch.arange(best.shape[1], device=dev).expand_as(partner))
        merged = rank < r_i[:, None]
        # output order: prefix 0, unmerged real A 1, real B 2, padding 3; merged A 4 (removed);
        # a sample that merges nothing keeps its order, as it does alone
        code = torch.where(cur, 3, torch.where(r_i[:, None] > 0, 2, 1))
        code[:, :prefix] = 0
        a_pos = split_ab(pos[None], prefix)[0].expand(bsz, -1)
        code = code.scatter(1, a_pos, torch.where(pa, 3, torch.where(merged, 4, 1)))
        order = (code * n_tokens + pos).argsort(dim=1)
        slot = torch.empty_like(order).scatter_(1, order, pos.expand(bsz, -1))
        gone = order[:, n_out:]
        b_pos = split_ab(pos[None], prefix)[1].expand(bsz, -1)
        # removed padding goes to the last slot; a merged A token to its partner's slot
        last = torch.full_like(order, n_out - 1)
        to = last.scatter(1, a_pos, torch.where(pa, last[:, :1],
                                                slot.gather(1, b_pos.gather(1, partner))))
        pads_kept = n_out - (~cur).sum(1) + r_i
        live = (code.gather(1, gone) == 4) | (pads_kept[:, None] > 0)
    return perm.gather(1, order[:, :n_out]), perm.gather(1, gone), to.gather(1, gone), \
        live.float()


def _sample_counts(n_tokens: int, r, prefix: int, start, pad, real, best, min_tokens: int = 0):
    """(r per sample, tokens the batch keeps) for ``padded_plan``: each sample's r from its
    own ``real`` token count, at most half of them and its same-group pairs (``best`` > -inf);
    the batch keeps what the schedule keeps of ``n_tokens``, more only where a sample lacks
    pairs (never with one group of real tokens)."""
    own = (~pad).sum(1).expand(real.shape[0]) if pad is not None else start  # at the first merge
    want = torch.as_tensor(merge_count(r, real, prefix, own, min_tokens), device=real.device)
    r_i = torch.minimum(want, ((real - prefix) // 2).clamp(min=0))
    r_i = torch.minimum(r_i, (best > float("-inf")).sum(1)).clamp(min=0)
    batch_r = _batch_count(r, n_tokens, prefix, start, min_tokens)
    # a left-padded sample keeps one padding slot: the model reads its slot 0, a padding token,
    # by position (RoBERTa's pooler), and unmerging maps every padding token there
    padded = torch.zeros_like(real) if pad is None else pad[:, 0].long().expand(real.shape[0])
    # an unbacked size for torch.export, with checked bounds so later counts stay >= 0
    n_out = (n_tokens - (n_tokens - real + r_i - padded).min().clamp(max=batch_r)).item()
    torch._check(n_out >= 1)
    torch._check(n_out <= n_tokens)
    return r_i.clamp(max=n_tokens - n_out), n_out


def match_tokens(n_tokens: int, keys, r: int, prefix: int, keys_transposed: bool = False,
                 origin=None, groups=None, start=None, pad=None, min_tokens: int = 0):
    """The merge plan ``tome_merge`` applies to ``n_tokens`` tokens (see ``bipartite_plan``),
    or None where it merges nothing. ``r``/``start``/``min_tokens``: see ``merge_count``;
    ``origin``/``groups``/``pad``: see ``tome_merge``."""
    r_batch = _batch_count(r, n_tokens, prefix, start, min_tokens)
    if isinstance(r_batch, int) and r_batch <= 0:  # a symbolic count (torch.compile) takes no branch
        return None
    metric = keys_metric(keys, keys_transposed)
    if groups is None:
        return bipartite_plan(n_tokens, prefix, *bipartite_match(metric, r_batch, prefix))
    return padded_plan(n_tokens, metric, r, prefix, origin, groups, start, pad, min_tokens)


def plan_where(n_tokens: int, plan) -> torch.Tensor:
    """[B, n_tokens] int64: the output position of each input token of a merge (a merged
    token: the slot it was added to)."""
    keep, src, dst, _ = plan
    bsz, n_out = keep.shape
    ranks = torch.arange(n_out, device=keep.device).expand(bsz, n_out)
    where = torch.empty(bsz, n_tokens, dtype=torch.long, device=keep.device).scatter_(1, keep, ranks)
    return where.scatter_(1, src, dst)


@fx.wrap
def tome_unmerge(x, dim: int, offset: int, *wheres):
    """``x`` with its token dimension ``dim`` back in the original token layout: every original
    token gets a copy of the merged token that holds it (ToMeSD's unmerge). ``wheres``: the
    ``plan_where`` maps of the merges ``x`` went through, in order; ``offset``: ``x`` holds the
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
               origin=None, groups=None, start=None, where: bool = False, pad=None,
               min_tokens: int = 0):
    """Merge ``r`` token pairs of ``x`` [B, N, C] (size-weighted), matched on ``keys``.

    ``size`` is [B, N, 1] or None (all ones). Returns (merged x, merged size). Output order:
    protected prefix, unmerged A tokens, B tokens, each in previous relative order.
    ``r`` (an int, or ``(kept, of)`` with ``start``): see ``merge_count``.

    With ``groups`` ([B, N0, K], one vector per *original* token, e.g. the attention mask) only
    tokens of equal group merge, and a third output is returned: ``origin`` [B, N'] int64, for
    each output token an original token of its group (``origin`` in: the same for the input
    tokens, None = identity). Token-aligned side tensors follow the merge by gathering it.
    ``pad`` ([B, N0] bool, with ``groups``): the padding tokens; each sample then merges as it
    would alone, by its own token count (``padded_plan``).
    ``min_tokens``: no sample merges below that many (real) tokens (``merge_count``).
    ``where=True`` appends the ``plan_where`` map as the last output (for ``tome_unmerge``).
    """
    n = x.shape[1]
    if size is None:
        size = ones_size(x)
    plan = match_tokens(n, keys, r, prefix, keys_transposed, origin, groups, start, pad,
                        min_tokens)
    if groups is None:
        out = (x, size) if plan is None else merge_by_plan(x, size, plan)
    else:
        origin = identity_origin(origin, x.shape[0], n, x.device)
        out = (x, size, origin) if plan is None else \
            (*merge_by_plan(x, size, plan), origin.gather(1, plan[0]))
    if not where:
        return out
    if plan is None:
        return (*out, torch.arange(n, device=x.device).repeat(x.shape[0], 1))
    return (*out, plan_where(n, plan))


def merge_by_plan(x, size, plan):
    """Apply a merge plan (``bipartite_plan``) to ``x`` [B, N, C] and ``size`` [B, N, 1].

    One row gather builds the output layout; each merged token is then added to its slot as
    the size-weighted mean, ``s_a / s_total * (x_a - x_slot)`` per partner, which touches only
    the merged rows. Untouched tokens are copied bit-exactly. Flat ``index_select`` /
    ``index_add`` are used because they are much cheaper than ``gather`` / ``scatter_add`` with
    channel-expanded indices on CPU.
    """
    keep, src, dst, live = plan
    bsz, n, c = x.shape
    n_out = keep.shape[1]
    batch = torch.arange(bsz, device=x.device)[:, None]
    keep_in = (keep + batch * n).reshape(-1)
    src_in = (src + batch * n).reshape(-1)
    dst_in = (keep.gather(1, dst) + batch * n).reshape(-1)
    dst_out = (dst + batch * n_out).reshape(-1)

    flat_size = size.reshape(-1)
    new_size = flat_size.index_select(0, keep_in).float()
    src_size = flat_size.index_select(0, src_in).float()
    if live is not None:  # dropped padding adds nothing
        src_size = src_size * live.reshape(-1)
    new_size.index_add_(0, dst_out, src_size)
    weight = (src_size / new_size.index_select(0, dst_out))[:, None]

    flat = x.reshape(bsz * n, c)
    out = flat.index_select(0, keep_in)
    acc = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 rows are combined in fp32
    moved = (flat.index_select(0, src_in).to(acc) - flat.index_select(0, dst_in).to(acc)) * weight
    out = out.index_add(0, dst_out, moved.to(x.dtype))
    return out.view(bsz, n_out, c), new_size.view(bsz, n_out, 1).to(size.dtype)
