"""``method="tomesd"``: ToMeSD's local merging around the ops of transformer blocks over a 2-D
token grid (diffusion models), by ``ratio`` or ``flops_budget`` (``cost.tomesd``). Options, the
authors' names (``rules.tomesd.from_options``): ``ratio``, ``max_downsample``, ``sx``, ``sy``,
``use_rand``, ``seed``, ``merge_attn``, ``merge_crossattn``, ``merge_mlp``. A diffusers model
comes back as a ``DiffusionModule`` a pipeline can call."""
from __future__ import annotations

import dataclasses
import functools

import torch.nn as nn

from ..capture import capture
from ..cost import check_budget
from ..cost.tomesd import rewrite_tomesd
from ..diffusion import DiffusionModule, build_tomesd, call_inputs, is_diffusers
from ..diffusion import default_inputs as diffusion_inputs
from ..rules.tomesd import OPTIONS, from_options
from .common import check_model, finish
from .registry import Method, OptimizeCall, register_method


@register_method
class ToMeSDMethod(Method):
    """ToMeSD (Bolya & Hoffman 2023): local merging, unmerged after each op."""

    name = "tomesd"
    options = tuple(OPTIONS)
    doc = "local merging around each op of diffusion transformer blocks (ratio or budget)"

    def optimize(self, model: nn.Module, call: OptimizeCall) -> nn.Module:
        """A diffusers model gets default inputs from its config and comes back as a
        ``DiffusionModule``, which captures again for calls its graphs do not take
        (``diffusion.module``)."""
        self.check_unplanned(call)
        check_model(model)
        budget = call.flops_budget
        if call.r is not None:
            raise ValueError("method='tomesd' takes ratio or flops_budget, not r")
        unused = {"prop_attn": call.prop_attn in ("bias", "fold"),
                  "strategy": call.strategy != "auto", "calibration": call.calibration is not None}
        unused = [k for k, v in unused.items() if v]
        if unused:  # an error, not silently ignored
            raise ValueError(f"method='tomesd' takes no {unused[0]}: it merges locally, without "
                             "proportional attention, and a budget picks its levels and ratios")
        if budget is not None:
            check_budget(budget)
        found = from_options(call.options, budget is not None)
        if not (isinstance(model, nn.Module) and is_diffusers(model)):
            captured = capture(model, call.example_inputs)
            return finish(rewrite_tomesd(captured, found, budget), call.compile, budget, captured)
        inputs = call_inputs(model, diffusion_inputs(model) if call.example_inputs is None
                             else call.example_inputs)
        first = build_tomesd(found, budget, call.compile, model, inputs)
        if budget is not None:  # other calls keep the levels and ratios the budget chose
            found = dataclasses.replace(found, ratio={lv.downsample: lv.ratio
                                                      for lv in first.tome.levels})
        return DiffusionModule(model, functools.partial(build_tomesd, found, None, call.compile),
                               inputs, first)
