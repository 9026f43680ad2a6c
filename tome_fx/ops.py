"""Tensor functions called by rewritten graphs.

Pure functions of tensors, usable without any graph. The rewritten graph calls them by name
(``call_function``), so ``print(gm.code)`` reads like the algorithm. Token layout is
``[batch, tokens, channels]``; sizes are ``[batch, tokens, 1]`` float32.
"""
from __future__ import annotations

import torch
import torch.fx as fx


def _ones_size(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], x.shape[1], 1, dtype=torch.float32, device=x.device)


@fx.wrap
def keys_metric(keys: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Attention keys averaged over heads: [B, H, N, d] (or [B, H, d, N] if transposed) -> [B, N, d]."""
    if transposed:
        keys = keys.transpose(-1, -2)
    if keys.dim() == 4:
        keys = keys.mean(dim=1)
    return keys


def bipartite_match(metric: torch.Tensor, r: int, prefix: int):
    """ToMe bipartite soft matching over the tokens after ``prefix`` protected ones.

    Set A is the tokens at even absolute positions, set B at odd ones. Each A token proposes its
    most similar B token (cosine similarity); the ``r`` best proposals are merged.
    Returns (unmerged A indices sorted ascending, merged A indices, their B partners).
    """
    with torch.no_grad():
        m = metric[:, prefix:].float()
        m = m / m.norm(dim=-1, keepdim=True)
        off = prefix % 2
        scores = m[:, off::2] @ m[:, 1 - off :: 2].transpose(-1, -2)
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src = order[:, :r]
        unm = order[:, r:].sort(dim=-1).values
        dst = partner.gather(-1, src)
    return unm, src, dst


def merge_limit(n_tokens: int, prefix: int) -> int:
    """Largest r a block with ``n_tokens`` tokens and ``prefix`` protected ones can merge."""
    return max(n_tokens - prefix, 0) // 2


@fx.wrap
def tome_merge(x, keys, size, r: int, prefix: int, keys_transposed: bool = False):
    """Merge ``r`` token pairs of ``x`` [B, N, C] (size-weighted), matched on ``keys``.

    ``size`` is [B, N, 1] or None (all ones). Returns (merged x, merged size). Output order:
    protected prefix, unmerged A tokens, B tokens, each in previous relative order.
    """
    n = x.shape[1]
    r = min(r, merge_limit(n, prefix))
    if r <= 0:
        return x, (_ones_size(x) if size is None else size)
    metric = keys_metric(keys, keys_transposed)
    unm, src, dst = bipartite_match(metric, r, prefix)
    return merge_by_index(x, size, prefix, unm, src, dst)


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
    nb = (n - b0 + 1) // 2
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


@fx.wrap
def size_bias(size, ndim: int, dtype_like):
    """log(size) as an additive attention bias over keys, shaped to broadcast with logits."""
    bias = size[..., 0].log().to(dtype_like.dtype)
    return bias.reshape(bias.shape[0], *([1] * (ndim - 2)), bias.shape[1])


@fx.wrap
def add_attn_bias(mask, bias):
    """Combine an existing SDPA ``attn_mask`` (bool: True = keep, or float) with a float bias."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(
            ~mask, float("-inf")
        )
    return mask + bias


@fx.wrap
def weighted_mean(x, size, dim, keepdim: bool = False):
    """Size-weighted mean over the token dimension ``dim`` (size aligned with x's tokens)."""
    w = size.to(x.dtype)
    if dim != 1:
        w = w.movedim(1, dim)
    return (x * w).sum(dim=dim, keepdim=keepdim) / w.sum(dim=dim, keepdim=keepdim)
