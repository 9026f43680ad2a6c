"""Small hand-written models shared by the tests."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ExplicitAttention(nn.Module):
    """Explicit softmax attention, written by hand (no SDPA)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class PreNormBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ExplicitAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Pre-norm transformer over 16-d 'patches', class token in front, head on token 0."""

    def __init__(self, dim=64, heads=4, depth=4, classes=10, read_token=0):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(*[PreNormBlock(dim, heads) for _ in range(depth)])
        self.head = nn.Linear(dim, classes)
        self.read_token = read_token

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x)
        return self.head(x[:, self.read_token])


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder (post-norm, batch_first) with mean pooling."""

    def __init__(self, dim=64, heads=4, depth=3, norm_first=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


class CausalModel(nn.Module):
    """SDPA with is_causal=True: merging would mix future positions, so it must be refused."""

    def __init__(self, dim=32):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        y = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        return y + self.fc(y)


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


class RelPosAttention(ExplicitAttention):
    """Adds a learned bias indexed by token position to the logits (BEiT/Swin style)."""

    def __init__(self, dim, heads, tokens):
        super().__init__(dim, heads)
        self.rel_bias = nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5 + self.rel_bias
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class MHABlockModel(nn.Module):
    """Pre-norm blocks built on nn.MultiheadAttention called directly (default need_weights)."""

    def __init__(self, dim=32, heads=4, depth=2):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2 * depth)])
        self.attns = nn.ModuleList([nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(depth)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
                                   for _ in range(depth)])

    def forward(self, x):
        for i, (attn, mlp) in enumerate(zip(self.attns, self.mlps)):
            h = self.norms[2 * i](x)
            x = x + attn(h, h, h)[0]
            x = x + mlp(self.norms[2 * i + 1](x))
        return x.mean(dim=1)
