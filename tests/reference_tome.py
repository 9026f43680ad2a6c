"""Independent, deliberately plain reference implementation of ToMe for timm ViTs.

This module is a *test oracle*.  It re-derives the forward pass of a timm
``VisionTransformer`` (and DeiT's ``VisionTransformerDistilled``) from the
model's parameters, using explicit softmax attention, and inserts Token Merging
(bipartite soft matching, Bolya et al., ICLR 2023) between each block's
attention residual and its MLP residual.

It intentionally favours clarity over speed: merging is done one batch element
at a time with explicit Python index lists, so that it shares as little
structure as possible with a vectorised production implementation.

Public functions:
    reference_schedule(r, num_blocks) -> list[int]
    reference_forward(model, x, r_schedule, prop_attn=True) -> Tensor
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["reference_schedule", "reference_forward"]


# --------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------
def reference_schedule(r, num_blocks: int) -> List[int]:
    """Expand a ToMe ``r`` spec into one merge count per block.

    * ``int``            -> the same r for every block
    * ``list``           -> given values, zero padded up to ``num_blocks``
    * ``(r, inflect)``   -> linear schedule with the same total as ``[r]*num_blocks``
    """
    if isinstance(r, bool):
        raise TypeError("r must not be a bool")
    if isinstance(r, int):
        return [r for _ in range(num_blocks)]
    if isinstance(r, list):
        if len(r) > num_blocks:
            raise ValueError(f"schedule of length {len(r)} is longer than {num_blocks} blocks")
        out = [int(v) for v in r]
        while len(out) < num_blocks:
            out.append(0)
        return out
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError("tuple r must be (r, inflect)")
        base, inflect = r
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        if num_blocks == 1:
            return [lo]
        step = (hi - lo) / (num_blocks - 1)
        result = []
        i = 0
        while i < num_blocks:
            result.append(int(lo + step * i))
            i += 1
        return result
    raise TypeError(f"unsupported r spec: {r!r}")


# --------------------------------------------------------------------------
# small building blocks, written out by hand
# --------------------------------------------------------------------------
def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _norm(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if _is_identity(m):
        return x
    if isinstance(m, nn.LayerNorm):
        # covers torch LayerNorm and timm's LayerNorm subclass (same math)
        w = m.weight
        b = m.bias
        return F.layer_norm(x, m.normalized_shape, w, b, m.eps)
    # any other norm (RmsNorm etc.): defer to the module itself
    return m(x)


def _linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, m.weight, m.bias)


def _layer_scale(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if _is_identity(m):
        return x
    gamma = getattr(m, "gamma", None)
    if gamma is None:
        raise NotImplementedError(f"unsupported layer-scale module {type(m).__name__}")
    return x * gamma


def _mlp(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(m).__name__ == "Mlp" and isinstance(getattr(m, "fc1", None), nn.Linear) \
            and isinstance(getattr(m, "fc2", None), nn.Linear):
        h = _linear(m.fc1, x)
        h = m.act(h)
        h = _norm(m.norm, h)
        h = _linear(m.fc2, h)
        return h
    # other MLP flavours (SwiGLU, GluMlp...) only touch the channel dim;
    # calling the module is still a per-token op and merging-agnostic.
    return m(x)


# --------------------------------------------------------------------------
# embedding
# --------------------------------------------------------------------------
def _embed(model: nn.Module, img: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Patchify, add prefix tokens and position embeddings. Returns (x, n_prefix)."""
    if getattr(model, "dynamic_img_size", False):
        raise NotImplementedError("dynamic_img_size is not supported by the reference")
    pe = model.patch_embed
    if getattr(pe, "dynamic_img_pad", False):
        raise NotImplementedError("dynamic_img_pad is not supported by the reference")
    if not getattr(pe, "flatten", True):
        raise NotImplementedError("non-flattening patch embed is not supported")
    conv = pe.proj
    if not isinstance(conv, nn.Conv2d):
        raise NotImplementedError("patch_embed.proj must be a Conv2d")
    feat = F.conv2d(img, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding)
    bsz, ch = feat.shape[0], feat.shape[1]
    tokens = feat.reshape(bsz, ch, -1).permute(0, 2, 1)  # [B, HW, C]
    tokens = _norm(getattr(pe, "norm", None), tokens)

    prefix_parts = []
    cls_token = getattr(model, "cls_token", None)
    dist_token = getattr(model, "dist_token", None)
    reg_token = getattr(model, "reg_token", None)
    if cls_token is not None:
        prefix_parts.append(cls_token.expand(bsz, -1, -1))
    if dist_token is not None:
        if reg_token is not None:
            raise NotImplementedError("dist_token together with reg_token is not supported")
        prefix_parts.append(dist_token.expand(bsz, -1, -1))
    if reg_token is not None:
        prefix_parts.append(reg_token.expand(bsz, -1, -1))
    n_prefix = sum(p.shape[1] for p in prefix_parts)
    if n_prefix != model.num_prefix_tokens:
        raise NotImplementedError(
            f"prefix token count mismatch: found {n_prefix}, model says {model.num_prefix_tokens}")

    pos = getattr(model, "pos_embed", None)
    if pos is None:
        x = torch.cat(prefix_parts + [tokens], dim=1)
    elif getattr(model, "no_embed_class", False):
        # position embedding covers only the patch tokens
        x = torch.cat(prefix_parts + [tokens + pos], dim=1)
    else:
        # position embedding covers prefix + patch tokens
        x = torch.cat(prefix_parts + [tokens], dim=1) + pos

    if not _is_identity(getattr(model, "patch_drop", None)):
        # PatchDropout is a no-op in eval mode
        if model.patch_drop.training:
            raise NotImplementedError("patch dropout in training mode")
    x = _norm(getattr(model, "norm_pre", None), x)
    return x, n_prefix


# --------------------------------------------------------------------------
# attention with proportional attention, returning the merge metric too
# --------------------------------------------------------------------------
def _attention(attn: nn.Module, x: torch.Tensor, sizes: torch.Tensor, prop_attn: bool):
    if type(attn).__name__ != "Attention":
        raise NotImplementedError(f"unsupported attention module {type(attn).__name__}")
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError("gated attention is not supported")
    bsz, n, _ = x.shape
    nh = attn.num_heads
    hd = attn.head_dim
    qkv = _linear(attn.qkv, x)                      # [B, N, 3*H*d]
    qkv = qkv.view(bsz, n, 3, nh, hd)
    q = qkv[:, :, 0].transpose(1, 2)                # [B, H, N, d]
    k = qkv[:, :, 1].transpose(1, 2)
    v = qkv[:, :, 2].transpose(1, 2)
    q = _norm(attn.q_norm, q)
    k = _norm(attn.k_norm, k)

    logits = torch.matmul(q, k.transpose(-1, -2)) * attn.scale   # [B, H, N, N]
    if prop_attn:
        # bias each key column j by log(size_j)
        key_bias = torch.log(sizes[:, :, 0])                      # [B, N]
        logits = logits + key_bias.view(bsz, 1, 1, n)
    weights = torch.softmax(logits, dim=-1)
    out = torch.matmul(weights, v)                                # [B, H, N, d]
    out = out.transpose(1, 2).reshape(bsz, n, nh * hd)
    out = _norm(getattr(attn, "norm", None), out)
    out = _linear(attn.proj, out)

    metric = k.mean(dim=1)                                        # [B, N, d]
    return out, metric


# --------------------------------------------------------------------------
# bipartite soft matching, one sample at a time
# --------------------------------------------------------------------------
def _merge_one(x: torch.Tensor, s: torch.Tensor, metric: torch.Tensor, r: int, n_prefix: int,
               margins=None):
    """x: [N, C], s: [N, 1], metric: [N, d]. Returns merged (x, s).

    If ``margins`` is a list, the smallest score gap behind any discrete decision
    (which A tokens get merged, and which B partner each merged A token picks)
    is appended to it; tiny gaps mean a decision is numerically fragile.
    """
    n = x.shape[0]
    a_pos = [i for i in range(n_prefix, n) if i % 2 == 0]
    b_pos = [i for i in range(n_prefix, n) if i % 2 == 1]

    with torch.no_grad():
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True)
        ma = m[a_pos]                                   # [Na, d]
        mb = m[b_pos]                                   # [Nb, d]
        sim = ma @ mb.t()                               # [Na, Nb]
        best_score, best_b = sim.max(dim=1)             # over B for each A
        order = torch.argsort(best_score, descending=True).tolist()

        if margins is not None:
            gaps = []
            ranked = best_score[order]
            if r < len(order):
                gaps.append((ranked[r - 1] - ranked[r]).item())
            if sim.shape[1] > 1:
                top2 = sim.topk(2, dim=1).values
                gaps.append((top2[order[:r], 0] - top2[order[:r], 1]).min().item())
            if gaps:
                margins.append(min(gaps))

    merged_a = set(order[:r])                           # indices into a_pos
    best_b = best_b.tolist()

    # accumulate weighted sums into B tokens
    xf = x * s                                          # size-weighted features
    b_sum = {bj: xf[bp].clone() for bj, bp in enumerate(b_pos)}
    b_size = {bj: s[bp].clone() for bj, bp in enumerate(b_pos)}
    for ai in sorted(merged_a):
        bj = best_b[ai]
        b_sum[bj] = b_sum[bj] + xf[a_pos[ai]]
        b_size[bj] = b_size[bj] + s[a_pos[ai]]

    rows_x = []
    rows_s = []
    for i in range(n_prefix):
        rows_x.append(x[i])
        rows_s.append(s[i])
    for ai, ap in enumerate(a_pos):
        if ai not in merged_a:
            rows_x.append(x[ap])
            rows_s.append(s[ap])
    for bj in range(len(b_pos)):
        rows_x.append(b_sum[bj] / b_size[bj])
        rows_s.append(b_size[bj])
    return torch.stack(rows_x, 0), torch.stack(rows_s, 0)


def _merge(x, sizes, metric, r, n_prefix, margins=None):
    n = x.shape[1]
    r = min(r, (n - n_prefix) // 2)
    if r <= 0:
        return x, sizes
    xs, ss = [], []
    for b in range(x.shape[0]):
        xb, sb = _merge_one(x[b], sizes[b], metric[b], r, n_prefix, margins)
        xs.append(xb)
        ss.append(sb)
    return torch.stack(xs, 0), torch.stack(ss, 0)


# --------------------------------------------------------------------------
# full forward
# --------------------------------------------------------------------------
def _attention_pool(pool: nn.Module, h: torch.Tensor, sizes: torch.Tensor,
                    prop_attn: bool) -> torch.Tensor:
    """timm's AttentionPoolLatent written out: learned queries attend to the tokens, a merged
    token's logit raised by log(size); then projection, MLP residual and the token pick."""
    if pool.pos_embed is not None:
        raise NotImplementedError("attention pooling with a position embedding")
    bsz, n, c = h.shape
    nh, hd, length = pool.num_heads, pool.head_dim, pool.latent_len
    q = _linear_or_module(pool.q, pool.latent.expand(bsz, -1, -1))
    q = q.reshape(bsz, length, nh, hd).transpose(1, 2)
    kv = _linear(pool.kv, h).reshape(bsz, n, 2, nh, hd).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    q, k = _norm(pool.q_norm, q), _norm(pool.k_norm, k)
    logits = (q * pool.scale) @ k.transpose(-2, -1)
    if prop_attn:
        logits = logits + torch.log(sizes[:, :, 0])[:, None, None, :]
    out = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(bsz, length, c)
    out = _linear_or_module(pool.proj, out)
    if pool.mlp is not None:
        out = out + _mlp(pool.mlp, _norm(pool.norm, out))
    return out[:, 0] if pool.pool == "token" else out.mean(dim=1)


def _check_model(model: nn.Module):
    pool = getattr(model, "attn_pool", None)
    if pool is not None and type(pool).__name__ != "AttentionPoolLatent":
        raise NotImplementedError(f"attention pooling {type(pool).__name__} is not supported")
    if getattr(model, "dynamic_img_size", False):
        raise NotImplementedError("dynamic_img_size is not supported")
    for blk in model.blocks:
        if type(blk).__name__ != "Block":
            raise NotImplementedError(f"unsupported block type {type(blk).__name__}")


@torch.no_grad()
def reference_forward(model: nn.Module, x: torch.Tensor, r_schedule: Sequence[int],
                      prop_attn: bool = True, margins=None) -> torch.Tensor:
    """Hand-written ToMe forward of a timm ViT (model must be in eval mode).

    ``margins``: optional list; receives one entry per (block, sample) merge with
    the smallest score gap behind that merge's discrete choices (diagnostics).
    """
    _check_model(model)
    if model.training:
        raise NotImplementedError("reference_forward only models eval mode")
    blocks = list(model.blocks)
    if len(r_schedule) != len(blocks):
        raise ValueError(f"schedule has {len(r_schedule)} entries for {len(blocks)} blocks")

    h, n_prefix = _embed(model, x)
    sizes = torch.ones(h.shape[0], h.shape[1], 1, dtype=torch.float32, device=h.device)

    for blk, r_i in zip(blocks, r_schedule):
        a_out, metric = _attention(blk.attn, _norm(blk.norm1, h), sizes, prop_attn)
        h = h + _layer_scale(blk.ls1, a_out)
        if r_i > 0:
            h, sizes = _merge(h, sizes, metric, int(r_i), n_prefix, margins)
        h = h + _layer_scale(blk.ls2, _mlp(blk.mlp, _norm(blk.norm2, h)))

    h = _norm(model.norm, h)

    is_distilled = getattr(model, "dist_token", None) is not None and hasattr(model, "head_dist")
    if is_distilled:
        if getattr(model, "distilled_training", False):
            raise NotImplementedError("distilled training mode")
        cls_out = _linear_or_module(model.head, h[:, 0])
        dist_out = _linear_or_module(model.head_dist, h[:, 1])
        return (cls_out + dist_out) / 2

    pool = model.global_pool
    if pool == "map":
        keep = 0 if getattr(model, "pool_include_prefix", False) else n_prefix
        pooled = _attention_pool(model.attn_pool, h[:, keep:], sizes[:, keep:], prop_attn)
    elif pool == "token":
        pooled = h[:, 0]
    elif pool == "avg":
        if getattr(model, "pool_include_prefix", False):
            raise NotImplementedError("avg pooling including prefix tokens")
        feats = h[:, n_prefix:]
        w = sizes[:, n_prefix:]
        pooled = (feats * w).sum(dim=1) / w.sum(dim=1)
    elif pool == "" or pool is None:
        raise NotImplementedError("no-pool (token output) models are not supported")
    else:
        raise NotImplementedError(f"global_pool={pool!r} not supported")
    pooled = _norm(model.fc_norm, pooled)
    return _linear_or_module(model.head, pooled)


def _linear_or_module(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return _linear(m, x)
    if _is_identity(m):
        return x
    return m(x)
