"""The first capture path: torch.fx symbolic tracing.

Non-tensor forward arguments are fixed to their signature defaults. torch.nn modules that
symbolic tracing treats as opaque leaves (``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer``,
``nn.MultiheadAttention``) are swapped for equivalent traceable stand-ins so that their attention
shows up in the graph.
"""
from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph.module import TomeModule
from .export import interpolates
from .guards import add_input_check, example_spec
from .inputs import declared_size
from .train import add_train_switches


# --------------------------------------------------------------------------------------------
# Traceable stand-ins for torch.nn attention modules
# --------------------------------------------------------------------------------------------


@fx.wrap  # one graph node: the dtype test cannot be traced, and the op is elementwise
def float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """torch.nn convention: bool True = masked out. Return an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


class TraceableMultiheadAttention(nn.Module):
    """Same function as ``nn.MultiheadAttention`` (batched inputs), written so fx can trace it.

    ``need_weights=False`` uses ``F.scaled_dot_product_attention``; ``need_weights=True`` uses an
    explicit softmax so that the weights can be returned, as the original does.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self.same_dim = mha._qkv_same_embed_dim
        if self.same_dim:
            self.in_proj_weight = mha.in_proj_weight
        else:
            self.q_proj_weight = mha.q_proj_weight
            self.k_proj_weight = mha.k_proj_weight
            self.v_proj_weight = mha.v_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def _project(self, query, key, value):
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        if self.same_dim:
            if key is query and value is query:
                return F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
            w = self.in_proj_weight
            wq, wk, wv = w[:e], w[e : 2 * e], w[2 * e :]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        self_attn = key is query and value is query
        if not self.batch_first:
            query = query.transpose(0, 1)
            key = query if self_attn else key.transpose(0, 1)
            value = query if self_attn else value.transpose(0, 1)
        bsz, tgt_len = query.shape[0], query.shape[1]
        src_len = key.shape[1]
        q, k, v = self._project(query, key, value)
        h, d = self.num_heads, self.head_dim
        q = q.reshape(bsz, tgt_len, h, d).transpose(1, 2)
        k = k.reshape(bsz, src_len, h, d).transpose(1, 2)
        v = v.reshape(bsz, src_len, h, d).transpose(1, 2)

        mask = None
        if attn_mask is not None:
            mask = float_mask(attn_mask, q)
            if mask.dim() == 3:  # [B*H, L, S]
                mask = mask.reshape(bsz, h, tgt_len, src_len)
        if key_padding_mask is not None:
            # indexing, not reshape(bsz, 1, 1, src_len): no stream sizes, so the mask can follow merges
            kpm = float_mask(key_padding_mask, q)[:, None, None, :]
            mask = kpm if mask is None else mask + kpm
        causal = bool(is_causal) and mask is None
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            logits = (q * (d**-0.5)) @ k.transpose(-2, -1)
            if causal:
                causal_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).tril()
                logits = logits.masked_fill(~causal_mask, float("-inf"))
            if mask is not None:
                logits = logits + mask
            attn = logits.softmax(dim=-1)
            weights = attn.mean(dim=1) if average_attn_weights else attn
            attn = F.dropout(attn, p=dropout_p)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal
            )
        out = out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


class TraceableEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer``'s reference (non-fast-path) computation, traceable."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        self.self_attn = _standin(layer.self_attn)
        self.linear1, self.linear2 = layer.linear1, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout, self.dropout1, self.dropout2 = layer.dropout, layer.dropout1, layer.dropout2
        self.activation = layer.activation
        self.norm_first = layer.norm_first

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TraceableEncoder(nn.Module):
    """``nn.TransformerEncoder`` without the nested-tensor fast path, traceable."""

    def __init__(self, enc: nn.TransformerEncoder):
        super().__init__()
        self.layers = nn.ModuleList([_standin(layer) for layer in enc.layers])
        self.norm = enc.norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        out = src
        for layer in self.layers:
            out = layer(
                out,
                src_mask=mask,
                src_key_padding_mask=src_key_padding_mask,
                is_causal=bool(is_causal),
            )
        if self.norm is not None:
            out = self.norm(out)
        return out


def _mha_supported(mha: nn.MultiheadAttention) -> str | None:
    if mha.bias_k is not None or mha.add_zero_attn:
        return "nn.MultiheadAttention with add_bias_kv/add_zero_attn has no traceable form"
    return None


def _standin(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.TransformerEncoder):
        new = TraceableEncoder(module)
    elif isinstance(module, nn.TransformerEncoderLayer):
        new = TraceableEncoderLayer(module)
    elif isinstance(module, nn.MultiheadAttention) and _mha_supported(module) is None:
        new = TraceableMultiheadAttention(module)
    else:
        return module
    return new.train(module.training)


def swap_standins(model: nn.Module, notes: list[str]) -> nn.Module:
    """Replace resisting torch.nn modules (in place, on a copy) by traceable stand-ins."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.MultiheadAttention) and _mha_supported(child):
            notes.append(f"{name}: {_mha_supported(child)}; left opaque")
        new = _standin(child)
        if new is not child:
            setattr(model, name, new)
        else:
            swap_standins(child, notes)
    return model


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------

_CONCRETE_TYPES = (type(None), bool, int, float, str)


def _concrete_args(model: nn.Module, n_args: int, kwargs: dict) -> dict:
    """Signature defaults of non-tensor forward parameters the caller does not pass."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    concrete = {}
    params = [p for p in sig.parameters.values()]
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if i < n_args or p.name in kwargs:
            continue
        if p.default is not p.empty and isinstance(p.default, _CONCRETE_TYPES):
            concrete[p.name] = p.default
    return concrete


def with_standins(model: nn.Module, notes: list[str]) -> nn.Module:
    """``model`` (a copy the caller owns) with its opaque torch.nn modules swapped."""
    root = _standin(model)
    return root if root is not model else swap_standins(model, notes)


def trace(work: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """Symbolic tracing of ``work`` (from ``with_standins``, in the mode to record; its dropout
    then follows ``.train()``, ``capture.train``), in eval mode, with a check of the inputs'
    number of dimensions (and of the input size a model that does not interpolate declares)
    first; raises what fx raises."""
    traced = fx.symbolic_trace(work, concrete_args=_concrete_args(work, len(args), kwargs) or None)
    gm = TomeModule(traced, traced.graph, type(traced).__name__)
    _drop_dead_values(gm)
    fixed = None if interpolates(work, kwargs) else declared_size(work)
    add_input_check(gm, example_spec(gm, args, kwargs, fixed))
    add_train_switches(gm)
    gm.eval()
    return gm


def _drop_dead_values(gm: fx.GraphModule) -> None:
    """Remove unused pure values (e.g. attention weights nobody reads), so they do not look
    like extra consumers of the attention. In-place and side-effecting calls stay."""
    for node in reversed(list(gm.graph.nodes)):
        if node.users or node.op not in ("call_function", "call_method", "call_module"):
            continue
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__") or node.is_impure():
            continue
        gm.graph.erase_node(node)
    gm.recompile()
