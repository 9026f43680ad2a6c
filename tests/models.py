"""Hand-written models shared by the tests: plain-PyTorch transformers tome_fx rewrites, and
position-dependent attention it must refuse (windows, per-position tables, rotary embeddings,
causal masks)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Mlp(nn.Sequential):
    def __init__(self, dim):
        super().__init__(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class SoftmaxAttention(nn.Module):
    """Explicit ``softmax(q k^T / sqrt(d)) v`` (no SDPA); subclasses hook q/k or the logits."""

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
    """Pre-norm attention -> MLP block."""

    def __init__(self, attn, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = attn, Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """Tokens in ([B, N, 16] 'patches'), optional class token, blocks, optional final norm, and a
    head on token ``read_token`` (``pool="cls"``) or on the token mean (``pool="mean"``)."""

    def __init__(self, make_attn, dim=32, depth=3, cls=True, pool="cls", final_norm=True,
                 read_token=0, classes=10):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim)) if cls else None
        self.blocks = nn.Sequential(*[Block(make_attn(dim), dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()
        self.head = nn.Linear(dim, classes)
        self.pool, self.read_token = pool, read_token
        self.num_prefix_tokens = 1 if cls else 0

    def forward(self, x):
        x = self.embed(x)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x))
        return self.head(x[:, self.read_token] if self.pool == "cls" else x.mean(dim=1))


class RegistersAfterClass(Encoder):
    """Class token, position table, then register tokens inserted after the class token, as HF
    DINOv2 with registers does: ``cat(x[:, :1], registers, x[:, 1:])``."""

    def __init__(self, registers=4, patches=16, dim=32, depth=3):
        super().__init__(lambda d: SoftmaxAttention(d, 4), dim, depth)
        self.pos = nn.Parameter(torch.randn(1, patches + 1, dim))
        self.registers = nn.Parameter(torch.randn(1, registers, dim))
        self.num_prefix_tokens = 1 + registers

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = torch.cat([x[:, :1], self.registers.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return self.head(self.norm(self.blocks(x))[:, 0])


class TwoStage(nn.Module):
    """Two stages of blocks at different token counts (a pyramid, a UNet's levels): 8x8 patches,
    a strided convolution on the folded grid, then 4x4; a head on the token mean."""

    def __init__(self, dim=32, depth=2):
        super().__init__()
        self.embed, self.down = nn.Conv2d(3, dim, 4, 4), nn.Conv2d(dim, dim, 2, 2)
        self.stage1 = nn.Sequential(*[Block(SoftmaxAttention(dim, 4), dim) for _ in range(depth)])
        self.stage2 = nn.Sequential(*[Block(SoftmaxAttention(dim, 4), dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x):  # x: [B, 3, 32, 32]
        x = self.embed(x)
        t = self.stage1(x.flatten(2).transpose(1, 2))
        x = t.transpose(1, 2).reshape(x.shape[0], -1, 8, 8)
        return self.head(self.stage2(self.down(x).flatten(2).transpose(1, 2)).mean(1))


class TextReadout(nn.Module):
    """A class-token encoder over 16-d 'patches' whose head also reads a second input (text
    tokens) through a learned query: that attention's keys are never merged tokens."""

    def __init__(self, dim=32, depth=2):
        super().__init__()
        self.encoder = explicit_softmax_encoder(dim=dim, depth=depth, classes=dim)
        self.query = nn.Parameter(torch.randn(1, 1, dim))

    def forward(self, x, text):  # x: [B, N, 16], text: [B, T, dim]
        q = self.query.expand(x.shape[0], -1, -1)
        return self.encoder(x) + F.scaled_dot_product_attention(q, text, text)[:, 0]


def explicit_softmax_encoder(**kw):
    return Encoder(lambda d: SoftmaxAttention(d, 4), **kw)


def TinyTransformer(dim=64, heads=4, depth=4, classes=10, read_token=0):  # noqa: N802
    """Pre-norm explicit-softmax transformer over 16-d 'patches', class token in front, head on
    token ``read_token``, no final norm."""
    return Encoder(lambda d: SoftmaxAttention(d, heads), dim, depth, final_norm=False,
                   read_token=read_token, classes=classes)


class MHAEncoder(nn.Module):
    """Blocks on nn.MultiheadAttention called directly, mean pooled: post-norm with
    ``need_weights=False`` (SDPA), or pre-norm with ``need_weights=True`` (explicit softmax).
    ``in_dim=None``: no embedding (inputs are ``dim`` wide); ``classes=None``: no head."""

    def __init__(self, dim=32, heads=4, depth=3, norm_first=False, need_weights=False, in_dim=16,
                 classes=10):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim) if in_dim else nn.Identity()
        self.attn = nn.ModuleList([nn.MultiheadAttention(dim, heads, batch_first=True)
                                   for _ in range(depth)])
        self.mlp = nn.ModuleList([Mlp(dim) for _ in range(depth)])
        self.n1 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.n2 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, classes) if classes else nn.Identity()
        self.norm_first, self.need_weights = norm_first, need_weights
        self.num_prefix_tokens = 0

    def forward(self, x):
        x = self.embed(x)
        for attn, mlp, n1, n2 in zip(self.attn, self.mlp, self.n1, self.n2):
            if self.norm_first:
                h = n1(x)
                x = x + attn(h, h, h, need_weights=self.need_weights)[0]
                x = x + mlp(n2(x))
            else:
                x = n1(x + attn(x, x, x, need_weights=self.need_weights)[0])
                x = n2(x + mlp(x))
        return self.head(x.mean(dim=1))


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder (pre- or post-norm), mean pooled. ``in_dim=None``: no embedding."""

    def __init__(self, dim=32, heads=4, depth=3, norm_first=False, batch_first=True, in_dim=16,
                 classes=10):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim) if in_dim else nn.Identity()
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=batch_first,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)
        self.batch_first = batch_first
        self.num_prefix_tokens = 0

    def forward(self, x):
        x = self.embed(x)
        if not self.batch_first:
            return self.head(self.encoder(x.transpose(0, 1)).mean(dim=0))
        return self.head(self.encoder(x).mean(dim=1))


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow defeats symbolic tracing
            return self.fc(x)
        return x


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

    def __init__(self, dim, heads, fused=True):
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
        self.blocks = nn.Sequential(*[Block(CausalSelfAttention(dim, 4, fused), dim)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        return self.head(self.norm(self.blocks(x)))
