"""Hand-written models for the zoo: plain-PyTorch transformers and position-dependent attention
that tome_fx must refuse (windows, per-position tables, rotary embeddings, causal masks)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Mlp(nn.Sequential):
    def __init__(self, dim):
        super().__init__(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class SoftmaxAttention(nn.Module):
    """Explicit ``softmax(q k^T / sqrt(d)) v``; subclasses hook q/k or the logits."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def qk_hook(self, q, k):
        return q, k

    def logits_hook(self, logits):
        return logits

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.qk_hook(q, k)
        logits = torch.matmul(q, k.transpose(-2, -1)) / (c // self.heads) ** 0.5
        attn = torch.softmax(self.logits_hook(logits), dim=-1)
        return self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, attn, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = attn, Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """Tokens in ([B, N, 16] 'patches'), optional class token, blocks, mean or class-token head."""

    def __init__(self, make_attn, dim=32, depth=3, cls=True, pool="cls"):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim)) if cls else None
        self.blocks = nn.Sequential(*[Block(make_attn(dim), dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)
        self.pool = pool
        self.num_prefix_tokens = 1 if cls else 0

    def forward(self, x):
        x = self.embed(x)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))


def explicit_softmax_encoder(**kw):
    return Encoder(lambda d: SoftmaxAttention(d, 4), **kw)


class MHAEncoder(nn.Module):
    """Post-norm blocks on nn.MultiheadAttention called directly (need_weights=False: SDPA)."""

    def __init__(self, dim=32, heads=4, depth=3):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.attn = nn.ModuleList([nn.MultiheadAttention(dim, heads, batch_first=True)
                                   for _ in range(depth)])
        self.mlp = nn.ModuleList([Mlp(dim) for _ in range(depth)])
        self.n1 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.n2 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)
        self.num_prefix_tokens = 0

    def forward(self, x):
        x = self.embed(x)
        for attn, mlp, n1, n2 in zip(self.attn, self.mlp, self.n1, self.n2):
            x = n1(x + attn(x, x, x, need_weights=False)[0])
            x = n2(x + mlp(x))
        return self.head(x.mean(dim=1))


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder (pre- or post-norm), mean pooled."""

    def __init__(self, dim=32, heads=4, depth=3, norm_first=False, batch_first=True):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=batch_first,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)
        self.batch_first = batch_first
        self.num_prefix_tokens = 0

    def forward(self, x):
        x = self.embed(x)
        if not self.batch_first:
            return self.head(self.encoder(x.transpose(0, 1)).mean(dim=0))
        return self.head(self.encoder(x).mean(dim=1))


# ------------------------------------------------------------------------------------------
# position-dependent attention: must be refused
# ------------------------------------------------------------------------------------------

class WindowAttention(SoftmaxAttention):
    """Attention inside non-overlapping windows of ``window`` consecutive tokens, no bias
    (Swin's windowing without its relative-position table)."""

    def __init__(self, dim, heads, window=4):
        super().__init__(dim, heads)
        self.window = window

    def forward(self, x):
        b, n, c = x.shape
        w = x.reshape(b * (n // self.window), self.window, c)  # window partition
        return super().forward(w).reshape(b, n, c)


class RotaryAttention(SoftmaxAttention):
    """1-D rotary position embedding on q and k, built from the current token count."""

    def qk_hook(self, q, k):
        n, d = q.shape[-2], q.shape[-1]
        pos = torch.arange(n, dtype=q.dtype, device=q.device)
        freq = 1.0 / (100.0 ** (torch.arange(0, d, 2, dtype=q.dtype, device=q.device) / d))
        ang = pos[:, None] * freq[None, :]  # broadcasting: every op on it is element-wise
        cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)

        def rot(t):
            t1, t2 = t[..., 0::2], t[..., 1::2]
            return torch.stack([-t2, t1], dim=-1).flatten(-2)

        return q * cos + rot(q) * sin, k * cos + rot(k) * sin


class PerBlockPosition(nn.Module):
    """A block that adds a learned position embedding sliced to the current token count."""

    def __init__(self, dim, tokens=64):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.5)
        self.block = Block(SoftmaxAttention(dim, 4), dim)

    def forward(self, x):
        return self.block(x + self.pos[:, : x.shape[1]])


class RelPosBiasAttention(SoftmaxAttention):
    """A learned bias per (query, key) position pair added to the logits, sliced to the token
    count (BEiT/Swin's relative-position table, looked up for the current length)."""

    def __init__(self, dim, heads, tokens=64):
        super().__init__(dim, heads)
        self.table = nn.Parameter(torch.randn(heads, tokens, tokens))

    def logits_hook(self, logits):
        n = logits.shape[-1]
        return logits + self.table[:, :n, :n]


class SdpaRelPosAttention(RelPosBiasAttention):
    """The same table passed to SDPA as a float attn_mask (timm BEiT's fused path)."""

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.table[:, :n, :n])
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class CausalSelfAttention(nn.Module):
    """GPT-style: SDPA with is_causal=True, or a tril mask built for the current length."""

    def __init__(self, dim, heads, fused=True, tokens=64):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
            keep = torch.ones_like(att[0, 0], dtype=torch.bool).tril()  # [n, n]
            att = att.masked_fill(~keep, float("-inf"))
            y = att.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class TinyGPT(nn.Module):
    """A decoder LM: token + position embeddings, causal blocks, LM head on every position."""

    def __init__(self, vocab=50, dim=32, depth=2, tokens=64, fused=True):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(CausalSelfAttention(dim, 4, fused, tokens), dim)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        return self.head(self.norm(self.blocks(x)))
