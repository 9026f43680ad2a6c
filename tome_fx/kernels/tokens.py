"""Tensor functions both merging methods' rewrites call: token sizes, padding groups and side
tensors that follow merges, the proportional-attention bias, size-weighted pooling.

Token layout ``[batch, tokens, channels]``; sizes ``[batch, tokens, 1]`` float32.
"""
from __future__ import annotations

import torch
import torch.fx as fx


def ones_size(x: torch.Tensor) -> torch.Tensor:
    """Size 1 for every token of ``x`` (nothing merged yet)."""
    return torch.ones(x.shape[0], x.shape[1], 1, dtype=torch.float32, device=x.device)


def identity_origin(origin, batch: int, n_tokens: int, device) -> torch.Tensor:
    """``origin`` [B, N] (an original token per token), or the identity when None."""
    if origin is not None:
        return origin
    return torch.arange(n_tokens, device=device).expand(batch, n_tokens)


def current_groups(groups: torch.Tensor, origin, batch: int, n_tokens: int) -> torch.Tensor:
    """The group vector of each current token: ``groups`` [B, N0, K] (one per original token)
    gathered at the tokens' ``origin``."""
    origin = identity_origin(origin, batch, n_tokens, groups.device)
    return groups.gather(1, origin[..., None].expand(-1, -1, groups.shape[-1]))


@fx.wrap
def token_groups(*masks):
    """Group vector per token from token-aligned inputs ([B, N, ...] each) -> [B, N, K] float."""
    return torch.cat([m.reshape(m.shape[0], m.shape[1], -1).float() for m in masks], dim=-1)


@fx.wrap
def key_padding(mask, fill=None):
    """[B, N] bool: the keys an attention mask hides from every query of a sample (padding).

    ``mask`` broadcasts to the logits [B, ..., Nq, N]: an SDPA ``attn_mask`` (bool, True =
    attend) or an additive one (float: masked at -1e4 and below, BERT's -10000 and HF's
    ``finfo.min``); with ``fill``, the condition of ``logits.masked_fill(mask, fill)``.
    """
    if fill is not None:
        off = mask.bool() if fill <= -1e4 else torch.zeros_like(mask, dtype=torch.bool)
    elif mask.dtype == torch.bool:
        off = ~mask
    else:
        off = mask <= -1e4
    return off.reshape(off.shape[0], -1, off.shape[-1]).all(dim=1)


@fx.wrap
def follow_tokens(t, origin, dims: tuple):
    """Re-index a token-aligned side tensor (original token layout, batch at dim 0 or
    broadcast) to the merged layout: gather each of ``dims`` with ``origin`` [B, N']."""
    b, n = origin.shape
    if t.shape[0] != b:
        t = t.expand(b, *t.shape[1:])
    for d in dims:
        view = [1] * t.dim()
        view[0], view[d] = b, n
        shape = list(t.shape)
        shape[d] = n
        t = t.gather(d, origin.reshape(view).expand(shape))
    return t


@fx.wrap
def size_bias(size, ndim: int, dtype_like):
    """log(size) as an additive attention bias over keys, shaped to broadcast with logits."""
    bias = size[..., 0].log().to(dtype_like.dtype)
    return bias.reshape(bias.shape[0], *([1] * (ndim - 2)), bias.shape[1])


@fx.wrap
def fold_size(q, k, v, size, scale: float):
    """Proportional attention without a mask: ``(q', k', v')`` such that
    ``sdpa(q', k', v', scale=scale)[..., :v.shape[-1]]`` equals
    ``sdpa(q, k, v, attn_mask=log(size), scale=scale)``.

    ``log(s_j)`` on every logit of key j is a dot product with one more channel: queries get
    1 there, keys ``log(s_j) / scale``. q, k and v are zero-padded to one head dim, a multiple of
    8 (what fused kernels such as flash attention take); size-0 padding tokens get ``-inf``.
    """
    d, dv = q.shape[-1], v.shape[-1]
    width = -(-(max(d, dv) + 1) // 8) * 8
    bias = (size[..., 0].log() / scale).to(k.dtype)  # [B, N]
    bias = bias.reshape(bias.shape[0], *([1] * (k.dim() - 3)), bias.shape[1], 1)

    def padded(t, extra):
        parts = [t] + ([extra] if extra is not None else [])
        used = t.shape[-1] + (1 if extra is not None else 0)
        if width > used:
            parts.append(t.new_zeros(*t.shape[:-1], width - used))
        return torch.cat(parts, dim=-1)

    ones = q.new_ones(*q.shape[:-1], 1)
    return padded(q, ones), padded(k, bias.expand(*k.shape[:-1], 1)), padded(v, None)


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
    w = _token_weights(x, size, dim)
    return (x * w).sum(dim=dim, keepdim=keepdim) / w.sum(dim=dim, keepdim=keepdim)


@fx.wrap
def weighted_sum(x, size, dim, keepdim: bool = False):
    """Sum over merged tokens as the sum over their sources: each token counts ``size`` times."""
    return (x * _token_weights(x, size, dim)).sum(dim=dim, keepdim=keepdim)


def _token_weights(x, size, dim: int):
    """``size`` [B, N, 1] shaped to broadcast against ``x`` whose token dim is ``dim``."""
    w = size.to(x.dtype).reshape(size.shape[0], size.shape[1], *([1] * (x.dim() - 2)))
    return w.movedim(1, dim) if dim % x.dim() != 1 else w
