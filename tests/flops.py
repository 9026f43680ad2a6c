"""The tests' FLOP counter: ``FlopCounterMode`` with the formulas of every op the cost model
prices registered here, so a FLOP test never depends on which ops a torch release counts.

torch 2.14 counts 0 for CPU fused attention (``aten._scaled_dot_product_flash_attention_for_cpu``)
where earlier releases counted it; matrix products and convolutions could change the same way.
Convention (as ``tome_fx.cost``): 2 FLOPs per multiply-add; element-wise ops count 0.
"""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _mm(a, b, *_, **__):
    return 2 * a[0] * a[1] * b[1]


def _addmm(bias, a, b, *_, **__):
    return _mm(a, b)


def _bmm(a, b, *_, **__):
    return 2 * a[0] * a[1] * a[2] * b[2]


def _baddbmm(bias, a, b, *_, **__):
    return _bmm(a, b)


def _conv(x, w, bias, stride, padding, dilation, transposed, *_, out_shape=None, **__):
    # each output (input, if transposed) element is a dot product over w.shape[1:]
    return 2 * math.prod(x if transposed else out_shape) * math.prod(w[1:])


def _attention(q, k, v, *_, **__):
    """QK^T and AV of ``[B, H, L, d]`` query/key/value (every SDPA kernel takes that layout)."""
    return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


_ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                  "_scaled_dot_product_fused_attention_overrideable")

FORMULAS = {aten.mm: _mm, aten.addmm: _addmm, aten.bmm: _bmm, aten.baddbmm: _baddbmm,
            aten.convolution: _conv}
FORMULAS.update({getattr(aten, name): _attention for name in _ATTENTION_OPS if hasattr(aten, name)})


def counted_flops(fn, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` with ``FORMULAS``, with grad enabled: in eval mode under
    no_grad ``nn.TransformerEncoder`` runs a fused fast path (``_transformer_encoder_layer_fwd``)
    that no formula covers; with grad it runs the ops above."""
    with torch.enable_grad(), FlopCounterMode(display=False, custom_mapping=FORMULAS) as fc:
        fn(*args, **kwargs)
    return fc.get_total_flops()
