"""Capture a model as a torch.fx GraphModule.

Symbolic tracing in eval mode on a deep copy of the user's model. Non-tensor forward
arguments are fixed to their signature defaults. torch.nn modules that symbolic tracing treats
as opaque leaves (``nn.TransformerEncoder``, ``nn.TransformerEncoderLayer``,
``nn.MultiheadAttention``) are swapped for equivalent traceable stand-ins so that their attention
shows up in the graph. When symbolic tracing fails (HuggingFace transformers v5 models), or the
model is given as a ``torch.export.ExportedProgram``, the graph comes from torch.export instead
(``export_capture``); ``Captured.frontend`` says which.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import CaptureError, one_line
from .export_capture import capture_export, exported_inputs, is_exported_program


@dataclass
class Captured:
    """A traced copy of a model plus what capture noticed."""

    graph_module: fx.GraphModule
    frontend: str  # "fx" (symbolic tracing) | "export" (torch.export, ATen-level graph)
    model_class: str
    args: tuple  # example positional inputs (tensors) matching the graph placeholders
    kwargs: dict
    notes: list[str] = field(default_factory=list)


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


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tensor, a tuple of inputs or a dict, not {type(example_inputs).__name__}"
    )


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


_memo: dict | None = None  # (model, inputs) ids -> Captured, inside ``reuse_captures``


@contextlib.contextmanager
def reuse_captures():
    """Within this block, capturing the same model object with the same inputs object again
    returns a copy of the first capture (one ``optimize`` call captures once, not per pass)."""
    global _memo
    outer = _memo
    _memo = {} if outer is None else outer
    try:
        yield
    finally:
        _memo = outer


def capture(model: nn.Module, example_inputs: Any = None) -> Captured:
    """Capture a deep copy of ``model`` (in eval mode) as a GraphModule.

    torch.fx symbolic tracing first (``frontend="fx"``); if that fails, or ``model`` is a
    ``torch.export.ExportedProgram``, torch.export (``frontend="export"``, see export_capture).
    """
    if _memo is None:
        return _capture(model, example_inputs)
    key = (id(model), id(example_inputs))
    if key not in _memo:
        _memo[key] = (model, example_inputs, _capture(model, example_inputs))  # keeps ids alive
    cap = _memo[key][2]
    return dataclasses.replace(cap, graph_module=copy.deepcopy(cap.graph_module),
                               notes=list(cap.notes))


def _capture(model: nn.Module, example_inputs: Any = None) -> Captured:
    if is_exported_program(model):
        args, kwargs = (normalize_inputs(example_inputs) if example_inputs is not None
                        else exported_inputs(model))
        notes = ["captured from the given torch.export ExportedProgram"]
        gm = capture_export(model, args, kwargs, "ExportedProgram", notes)
        return Captured(gm, "export", "ExportedProgram", args, kwargs, notes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    name = type(model).__name__
    notes: list[str] = []
    work = copy.deepcopy(model).eval()
    root = _standin(work)
    work = (root if root is not work else swap_standins(work, notes)).eval()
    concrete = _concrete_args(work, len(args), kwargs)
    try:
        gm = fx.symbolic_trace(work, concrete_args=concrete or None)
    except Exception as exc:  # fx raises many kinds; report them as one line
        reason = one_line(exc)
        try:
            gm = capture_export(work, args, kwargs, name, notes)
        except CaptureError as exc2:
            raise CaptureError(f"cannot trace {name} with torch.fx: {reason}; {exc2}") from exc
        notes.insert(0, f"captured with torch.export: torch.fx cannot trace {name} ({reason})")
        return Captured(gm, "export", name, args, kwargs, notes)
    _drop_dead_values(gm)
    gm.eval()
    return Captured(gm, "fx", name, args, kwargs, notes)


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
