"""Hand-written BERT-style models with padding masks, fx-traceable (tests of mask following)."""
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tome_fx.kernels import tome as ops


class BertSelfAttention(nn.Module):
    def __init__(self, dim, heads, explicit, positional=False):
        super().__init__()
        self.heads, self.explicit, self.positional = heads, explicit, positional
        self.fill = False
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q = self.q(x).reshape(b, n, h, d).transpose(1, 2)
        k = self.k(x).reshape(b, n, h, d).transpose(1, 2)
        v = self.v(x).reshape(b, n, h, d).transpose(1, 2)
        if self.explicit:
            logits = q @ k.transpose(-1, -2) / d**0.5
            if self.fill:  # bool mask, True = keep
                logits = logits.masked_fill(~mask, float("-inf"))
            else:
                logits = logits + mask
            y = logits.softmax(dim=-1) @ v
        elif self.positional:  # mask passed by position
            y = F.scaled_dot_product_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class BertLayer(nn.Module):
    """Post-norm, as BERT."""

    def __init__(self, dim, heads, explicit, positional=False):
        super().__init__()
        self.attn = BertSelfAttention(dim, heads, explicit, positional)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask):
        x = self.norm1(x + self.attn(x, mask))
        return self.norm2(x + self.mlp(x))


class MiniBert(nn.Module):
    """Token + position embeddings, additive mask from ``attention_mask`` ([B,1,1,N], or
    expanded to [B,1,N,N]), post-norm layers; head: ``pooler`` (tanh(dense(h[:, 0])), BERT),
    ``first2`` (mean of tokens 0 and 1), ``mean`` (sentence-transformers masked mean), ``sum``
    (masked sum) or ``max``."""

    def __init__(self, vocab=50, dim=32, heads=4, depth=3, max_len=64, explicit=False,
                 head="pooler", mask4d=False, bool_mask=False, positional=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([BertLayer(dim, heads, explicit, positional) for _ in range(depth)])
        self.pooler = nn.Linear(dim, dim)
        self.cls = nn.Linear(dim, 3)
        self.head, self.mask4d, self.bool_mask = head, mask4d, bool_mask
        for layer in self.layers:
            layer.attn.fill = bool_mask

    def forward(self, input_ids, attention_mask):
        b, n = input_ids.shape
        x = self.norm(self.tok(input_ids) + self.pos(torch.arange(n, device=input_ids.device)))
        if self.bool_mask:
            mask = attention_mask[:, None, None, :].bool()
        else:
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        if self.mask4d:
            mask = mask.expand(b, 1, n, n)
        for layer in self.layers:
            x = layer(x, mask)
        if self.head == "pooler":
            return self.cls(torch.tanh(self.pooler(x[:, 0])))
        if self.head == "first2":
            return self.cls(x[:, :2].mean(1))
        m = attention_mask.unsqueeze(-1).expand(x.size()).float()
        if self.head == "mean":
            return (x * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
        if self.head == "sum":
            return (x * m).sum(1)
        return (x * m).max(dim=1).values


class PaddedEncoder(nn.Module):
    """nn.TransformerEncoder with src_key_padding_mask and masked mean pooling."""

    def __init__(self, dim=32, heads=4, depth=3, norm_first=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, batch_first=True,
                                           norm_first=norm_first, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 5)

    def forward(self, x, pad):
        h = self.encoder(x, src_key_padding_mask=pad)
        keep = (~pad).float()[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1))


def bert_inputs(batch=3, n=24, vocab=50, lengths=(24, 17, 9), seed=0):
    """Token ids with [CLS]=1 at position 0 and padding (id 0, mask 0) after each length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, n), generator=g)
    ids[:, 0] = 1
    mask = torch.zeros(batch, n, dtype=torch.long)
    for i, length in enumerate(lengths[:batch]):
        mask[i, :length] = 1
        ids[i, length:] = 0
    return ids, mask


# Which original tokens each merged token holds, tracked independently of tome_fx's own
# bookkeeping: every merge call is re-run on [x, membership], membership starting as the identity.
class Track(fx.Interpreter):
    """Runs a rewritten module, tracking the original tokens inside each merged token."""

    def __init__(self, gm, grab=()):
        super().__init__(gm)
        self.member = None
        self.merges = []  # per merge: (size [B,N,1], membership [B,N,N0] bool)
        self.grab, self.grabbed = set(grab), {}

    def call_function(self, target, args, kwargs):
        if target is not ops.tome_merge:
            return super().call_function(target, args, kwargs)
        x = args[0]
        if self.member is None:
            self.member = torch.eye(x.shape[1]).expand(x.shape[0], -1, -1)
        out = target(torch.cat([x, self.member.to(x.dtype)], -1), *args[1:], **kwargs)
        c = x.shape[-1]
        self.member = out[0][..., c:]
        self.merges.append((out[1], self.member > 1e-6))
        return (out[0][..., :c], *out[1:])

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        if target in self.grab:
            self.grabbed[target] = out
        return out


def track(gm, *inputs, grab=()):
    t = Track(gm, grab)
    with torch.no_grad():
        out = t.run(*inputs)
    return t, out


def set_r(gm, r):
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is ops.tome_merge:
            n.update_arg(3, r)
    gm.recompile()
