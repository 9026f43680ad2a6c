"""Reference ToMe for the speed benchmark: a module-level patch of a timm ViT's blocks.

Written from the paper's algorithm (Bolya et al., ICLR 2023, Sec. 3) in the way the authors'
release applies it: the attention is explicit (``softmax(q k^T * scale + log s) v``, the N x N
matrix materialised), it returns the head-mean keys as the matching metric, each block merges
``r`` tokens after its attention residual by bipartite soft matching, and the token sizes travel
between blocks through Python state on the model. It is the baseline tome_fx is compared with,
at the same per-block schedule; it is not used by tome_fx.

Supports timm ``VisionTransformer`` with a class token (or no prefix tokens) and token pooling.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def _match(metric: torch.Tensor, r: int, class_token: bool):
    """Bipartite soft matching: even tokens (A) propose their most similar odd token (B)."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[:, 0, :] = -float("inf")  # the class token (first A token) never merges
        best, partner = scores.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)[..., None]
        kept = ranked[:, r:].sort(dim=1).values  # previous order, class token first
        moved = ranked[:, :r]
        into = partner[..., None].gather(1, moved)
    return kept, moved, into


def _apply(x: torch.Tensor, kept, moved, into) -> torch.Tensor:
    """Sum each moved A token into its B partner; output = kept A tokens, then B tokens."""
    a, b = x[:, ::2], x[:, 1::2]
    n, _, c = a.shape
    unmerged = a.gather(1, kept.expand(n, kept.shape[1], c))
    sources = a.gather(1, moved.expand(n, moved.shape[1], c))
    b = b.scatter_reduce(1, into.expand(n, into.shape[1], c), sources, reduce="sum")
    return torch.cat([unmerged, b], dim=1)


def merge_tokens(x, size, metric, r: int, class_token: bool):
    """Size-weighted merge of ``r`` tokens; returns (x, size)."""
    r = min(r, (x.shape[1] - int(class_token)) // 2)
    if size is None:
        size = torch.ones_like(x[..., :1])
    if r <= 0:
        return x, size
    kept, moved, into = _match(metric, r, class_token)
    x = _apply(x * size, kept, moved, into)
    size = _apply(size, kept, moved, into)
    return x / size, size


class ToMeAttention(nn.Module):
    """Explicit attention with proportional attention (log size over keys); returns the metric."""

    def forward(self, x, size):
        bsz, n, _ = x.shape
        qkv = self.qkv(x).reshape(bsz, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if size is not None:
            attn = attn + size.log()[:, None, None, :, 0]
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(bsz, n, -1)
        x = self.proj_drop(self.proj(self.norm(x)))
        return x, k.mean(dim=1)


class ToMeBlock(nn.Module):
    def forward(self, x):
        state = self._tome_state
        size = state["size"] if state["prop_attn"] else None
        y, metric = self.attn(self.norm1(x), size)
        x = x + self.drop_path1(self.ls1(y))
        if self._tome_r > 0:
            x, state["size"] = merge_tokens(x, state["size"], metric, self._tome_r,
                                            state["class_token"])
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _patched_class(base, mixin):
    return type(f"ToMe{base.__name__}", (mixin, base), {})


def apply_tome(model: nn.Module, schedule, prop_attn: bool = True) -> nn.Module:
    """A copy of timm ViT ``model`` whose blocks merge ``schedule[i]`` tokens each."""
    if getattr(model, "num_prefix_tokens", 0) > 1:
        raise NotImplementedError("reference ToMe patch: more than one prefix token")
    if getattr(model, "global_pool", "token") != "token":
        raise NotImplementedError("reference ToMe patch: only class-token pooling")
    if len(schedule) != len(model.blocks):
        raise ValueError(f"schedule has {len(schedule)} entries for {len(model.blocks)} blocks")
    model = copy.deepcopy(model)
    state = {"size": None, "prop_attn": prop_attn,
             "class_token": getattr(model, "cls_token", None) is not None}

    class Model(model.__class__):
        def forward(self, *args, **kwargs):
            state["size"] = None  # fresh sizes for every forward, as the released code does
            return super().forward(*args, **kwargs)

    Model.__name__ = f"ToMe{type(model).__name__}"
    model.__class__ = Model
    for blk, r in zip(model.blocks, schedule):
        blk.__class__ = _patched_class(type(blk), ToMeBlock)
        blk.attn.__class__ = _patched_class(type(blk.attn), ToMeAttention)
        blk._tome_r = int(r)
        blk._tome_state = state
    return model
