"""``method="tome"`` (the default): merge ``r`` token pairs in every attention->MLP block, by a
schedule ``r`` (int, per-block list or ``(r, inflect)``), a ``flops_budget`` (the cost model's
search, ``tome_fx.plan``) or a ``planned`` Plan; the fidelity floor ``min_tokens``. No options
of its own. Also the schedule helpers ``tome_fx.plan``, ``rewrite`` and ``explain`` use."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from ..capture import Captured, capture
from ..cost import STRATEGIES, CostModel, check_budget, search, to_plan
from ..cost.floor import apply_floor, resolve_min_tokens
from ..pipeline import Rewrite
from ..pipeline import rewrite as run_pipeline
from ..plans import Plan
from ..rules import ToMe
from ..schedule import parse_r
from .common import check_calibration, check_model, finish
from .registry import Method, OptimizeCall, register_method


def schedule_of(r):
    """``r`` as ``parse_r`` reads it, for any number of blocks."""
    return lambda n: parse_r(r, n)


def _padded(schedule: list[int]):
    return lambda n: list(schedule) + [0] * (n - len(schedule))


def rewrite_schedule(model: nn.Module, schedule_fn, example_inputs=None,
                     prop_attn: bool | str = True, drop: bool = True,
                     unmerge: str | bool = "auto") -> Rewrite:
    """Capture ``model`` and rewrite it with ``schedule_fn(num_blocks) -> r per block``."""
    return run_pipeline(capture(model, example_inputs), ToMe(schedule_fn, unmerge=unmerge),
                        prop_attn=prop_attn, drop=drop)


def plan_for_budget(captured: Captured, flops_budget: float, strategy: str = "auto",
                    prop_attn: bool | str = True, drop: bool = True,
                    unmerge: str | bool = "auto", calibration: Any = None,
                    min_tokens: int = 0) -> tuple[Plan, CostModel]:
    """(the plan ``tome_fx.plan`` returns, the cost model it was searched on)."""
    b = check_budget(flops_budget)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    calibration = check_calibration(captured, calibration)
    cm = CostModel.build(captured, prop_attn, drop, unmerge)
    cm.floor = min_tokens
    notes: list[str] = []
    schedule, drift = search(cm, b, strategy, notes, calibration)
    return to_plan(cm, schedule, b, strategy, drift, notes), cm


def rewrite_for_budget(captured: Captured, flops_budget: float, prop_attn: bool | str = True,
                       strategy: str = "auto", drop: bool = True,
                       unmerge: str | bool = "auto", calibration: Any = None,
                       min_tokens: int = 0) -> Rewrite:
    """The ToMe rewrite with the schedule ``plan`` picks; the module's ``.tome`` is that plan."""
    chosen, _ = plan_for_budget(captured, flops_budget, strategy, prop_attn, drop, unmerge,
                                calibration, min_tokens)
    return apply_floor(rewrite_planned(captured, dataclasses.replace(chosen, scales=True),
                                       prop_attn, drop, unmerge), min_tokens)


def rewrite_planned(captured: Captured, chosen: Plan, prop_attn: bool | str = True,
                    drop: bool = True, unmerge: str | bool = "auto") -> Rewrite:
    """The ToMe rewrite with ``chosen``'s r per block, no search: where it merges as planned,
    the module's ``.tome`` is ``chosen``. A plan from a budget (``tome_fx.plan``, or the
    ``.tome`` of ``optimize(flops_budget=...)``) scales with the token count, as there."""
    if chosen.method != "tome":
        raise ValueError(f"planned= takes a ToMe plan, got a {chosen.method} one")
    scales = chosen.scales or chosen.budget is not None
    chosen = dataclasses.replace(chosen, scales=scales)
    result = run_pipeline(captured, ToMe(_padded(chosen.r), scales=scales, unmerge=unmerge),
                          prop_attn=prop_attn, drop=drop)
    if result.plan.r == chosen.r:
        result.plan = chosen
        result.graph_module.tome = chosen
    return result


@register_method
class ToMeMethod(Method):
    """ToMe (Bolya et al. 2023): bipartite soft matching on the keys, ``r`` pairs per block."""

    name = "tome"
    options = ()
    doc = "bipartite merging of r token pairs per block (schedule, budget or plan)"

    def optimize(self, model: nn.Module, call: OptimizeCall) -> nn.Module:
        self.check_options(call)
        r, budget = call.r, call.flops_budget
        if call.planned is not None:
            result, captured = self._planned(model, call)
            return finish(result, call.compile, budget, captured)
        check_model(model)
        if r is not None and budget is not None:
            raise ValueError("pass either r or flops_budget, not both")
        if r is None and budget is None:
            raise ValueError("pass r (tokens merged per block) or flops_budget")
        if budget is not None:
            check_budget(budget)  # ValueError/TypeError naming the value
        if r is not None:
            parse_r(r, 1 if not isinstance(r, list) else max(len(r), 1))  # type/range errors early
        captured = capture(model, call.example_inputs)  # the one capture of this call
        floor = resolve_min_tokens(call.min_tokens, (captured.args, captured.kwargs))
        if budget is not None:  # schedule from the cost model (tome_fx.plan)
            result = rewrite_for_budget(captured, budget, call.prop_attn, call.strategy,
                                        call.drop_unread, call.unmerge, call.calibration, floor)
        else:
            result = apply_floor(run_pipeline(captured, ToMe(schedule_of(r), unmerge=call.unmerge),
                                              prop_attn=call.prop_attn, drop=call.drop_unread),
                                 floor)
        return finish(result, call.compile, budget, captured)

    def _planned(self, model, call: OptimizeCall) -> tuple[Rewrite, Captured]:
        """The schedule is given: no r and no search."""
        check_model(model)
        if call.r is not None:
            raise ValueError("pass either r or planned, not both")
        if not isinstance(call.planned, Plan):
            raise TypeError(f"planned must be a tome_fx.Plan, got {type(call.planned).__name__}")
        if call.flops_budget is not None:
            check_budget(call.flops_budget)
        captured = capture(model, call.example_inputs)
        result = apply_floor(rewrite_planned(captured, call.planned, call.prop_attn,
                                             call.drop_unread, call.unmerge),
                             resolve_min_tokens(call.min_tokens, (captured.args, captured.kwargs)))
        return result, captured
