"""``method="tomato"``: ToMato merges once, in one block, by a similarity threshold or to a
token count a ``flops_budget`` sets (``cost.tomato``). Options (``rules.tomato.ToMato``):
``sim_threshold``, ``similarity``, ``block``, ``grid``."""
from __future__ import annotations

import torch.nn as nn

from ..capture import capture
from ..cost.tomato import rewrite_tomato
from ..rules import ToMato
from ..rules.tomato import check_args
from .common import finish
from .registry import Method, OptimizeCall, register_method


@register_method
class ToMatoMethod(Method):
    """ToMato: one merge, every token whose most similar token is similar enough."""

    name = "tomato"
    options = ("sim_threshold", "similarity", "block", "grid")
    doc = "one merge by a similarity threshold or to a budget's token count"

    def optimize(self, model: nn.Module, call: OptimizeCall) -> nn.Module:
        self.check_unplanned(call)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if call.r is not None:
            raise ValueError("method='tomato' takes sim_threshold or flops_budget, not r")
        self.check_options(call)
        found = ToMato(**{k if k != "sim_threshold" else "threshold": v
                          for k, v in call.options.items()})
        check_args(found.threshold, call.flops_budget, found.similarity, found.block, found.grid)
        if found.threshold is not None and not call.prop_attn:
            raise ValueError("ToMato threshold mode needs prop_attn=True: its log(size) bias is "
                             "what keeps padding tokens (size 0) out of attention")
        captured = capture(model, call.example_inputs)
        result = rewrite_tomato(captured, found, call.flops_budget, call.prop_attn,
                                call.drop_unread)
        return finish(result, call.compile, call.flops_budget, captured)
