"""Public entry points: ``optimize``, ``compile``, ``explain``, ``plan``, ``rewrite``, ``export``.

Each captures the model once (``capture``), then runs the one rewrite (``pipeline``) with a
method (``methods``), under a schedule from the cost model (``cost``) for a FLOP budget.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from .capture import capture
from .compiling import compile_options
from .cost import check_budget
from .cost.floor import check_min_tokens, resolve_min_tokens
from .diffusion import DiffusionModule
from .exporting import Exported
from .exporting import export as export_module
from .methods import (DEFAULT_METHOD, OptimizeCall, calibration_inputs, check_calibration,
                      get_method, plan_for_budget, rewrite_schedule, schedule_of)
from .passes.size_bias import prop_attn_form
from .passes.unmerge import check_mode
from .pipeline import Rewrite
from .plans import Plan

__all__ = ["optimize", "compile", "explain", "plan", "rewrite", "export", "check_budget",
           "check_calibration"]


def rewrite(model: nn.Module, schedule_fn, example_inputs=None, prop_attn: bool | str = True,
            drop: bool = True, unmerge: str | bool = "auto") -> Rewrite:
    """Capture ``model`` and rewrite it with the default method; ``schedule_fn(num_blocks) ->
    list[int]`` gives r per block (see ``pipeline.rewrite``)."""
    return rewrite_schedule(model, schedule_fn, example_inputs, prop_attn, drop, unmerge)


def plan(model: nn.Module, flops_budget: float, example_inputs: Any = None,
         strategy: str = "auto", prop_attn: bool | str = True, drop: bool = True,
         unmerge: str | bool = "auto", calibration: Any = None, min_tokens="auto") -> Plan:
    """A merge schedule of the default method whose FLOPs are at most ``flops_budget`` times
    the original's (``min_tokens``: the fidelity floor, see ``optimize``).

    ``example_inputs`` set the token count; without them the model's declared input size is
    used (timm ``pretrained_cfg``, a config's ``image_size``). ``calibration``: real inputs
    (a ``Data``, a data path, or inputs as ``example_inputs`` takes them, with the same token
    count) on which ``"auto"`` compares schedules; they are the example inputs when those are
    not given.
    FLOPs come from ``CostModel`` (2 per multiply-add, as ``FlopCounterMode``), for the example
    inputs' batch. Guarantees: achieved ratio <= b, and >= b - 0.01 whenever an integer schedule
    gets there (dropping unread tokens, see ``optimize(drop_unread=)``, can leave the ratio
    lower with no merging at all); ``b = 1`` merges nothing; ``b`` below the smallest reachable
    ratio (the most merging every block allows) raises ValueError naming that ratio.

    Strategies (each is scaled to the budget, then adjusted block by block to land just below it):

    * ``"constant"``: the least constant r that meets the budget (the paper's constant r).
    * ``"decreasing"``: the paper's ``(r, -1)`` ramp, from 2r in the first block to 0.
    * ``"auto"`` (default), with ``calibration``: a family of schedules (constant; decreasing/increasing ramps of two
      slopes; front- and back-loaded; merging only after the first quarter/half; only in the
      first half; peaked in the middle), each fitted to the budget, and the one with the least
      **output drift** wins. Trailing blocks whose merge leaves the calibration outputs
      unchanged (the last block of a class-token model: the head never reads the tokens its MLP
      would process) are *free*: every shape merges the most there, so the FLOPs they save are
      not taken from blocks that matter (``Plan.notes`` names them). Output drift is the
      fidelity proxy: the mean over the calibration samples of the cosine distance
      ``1 - cos(f, f_r)`` between the unmerged model's output ``f`` and the merged model's
      ``f_r`` (token dimensions that merging shortens are averaged out). The constant and decreasing schedules are in the family,
      so on the calibration inputs "auto" is never worse than either.
    * ``"auto"`` without ``calibration``: the data-free rule, the constant schedule with the free
      trailing blocks merging the most (``cost.search.DATA_FREE``; output drift on random
      inputs did not predict accuracy on the trained models measured, ``benchmarks/EVAL.md``).
      ``Plan.notes`` says which rule was applied.

    The returned Plan's ``drift`` is the chosen schedule's proxy value for every strategy.
    """
    check_budget(flops_budget)
    check_mode(unmerge)
    calibration, example_inputs = calibration_inputs(calibration, example_inputs, model)
    captured, floor = capture(model, example_inputs), check_min_tokens(min_tokens)
    return plan_for_budget(captured, flops_budget, strategy, prop_attn, drop, unmerge, calibration,
                           resolve_min_tokens(floor, (captured.args, captured.kwargs)))[0]


def optimize(
    model: nn.Module,
    *,
    r: Any = None,
    flops_budget: float | None = None,
    example_inputs: Any = None,
    prop_attn: bool | str = True,
    compile: bool | dict = False,
    strategy: str = "auto",
    method: str = DEFAULT_METHOD,
    drop_unread: bool = True,
    unmerge: str | bool = "auto",
    calibration: Any = None,
    planned: Plan | None = None,
    min_tokens: int | str | None = "auto",
    **options: Any,
) -> nn.Module:
    """Return ``model`` with token merging inserted by ``method``: a new module computing with
    the model's own parameters (one copy of the weights, as ``torch.compile``; buffers are its
    own), ``model`` itself unchanged.

    ``method``: one of ``tome_fx.method_names()`` (default ``DEFAULT_METHOD``, bipartite merging
    in every attention->MLP block); ``**options`` are the method's own, documented with its
    plug-in (``tome_fx.methods.<name>``); an option it does not take, or a common argument it
    has no use for, is a one-line error. More methods: ``tome_fx.register_method``.
    The common arguments:

    ``r``: int (same every block), list (per block, padded with 0) or ``(r, inflect)``.
    ``flops_budget``: the FLOPs of the result as a share of the original's.
    ``strategy``: how ``flops_budget`` is turned into a schedule (see ``tome_fx.plan``).
    ``calibration``: real inputs (a ``Data`` from ``tome_fx.load_data``, a data path, or inputs
    as ``example_inputs`` takes them) on which the ``auto`` strategy compares schedules; they are
    the example inputs when ``example_inputs`` is not given. Without them ``auto`` applies the
    data-free rule (see ``tome_fx.plan``).
    The result is a ``torch.fx.GraphModule`` whose ``.tome`` attribute holds the ``Plan``, in
    the mode ``model`` is in; its dropout follows ``.train()``/``.eval()`` (``capture.train``),
    and it survives ``copy.deepcopy`` and ``torch.save`` (``graph.module.TomeModule``).
    ``compile``: True (or a dict of ``torch.compile`` options) returns it compiled with
    ``torch.compile(fullgraph=True)``; see ``tome_fx.compiling``.
    ``drop_unread``: after the last attention, compute only the protected tokens the output
    reads (a class-token head): exact, verified on the example inputs, skipped where it does not
    apply; the last block then merges nothing (``Plan`` shows the tokens as ``dropped``).
    ``unmerge``: where merged tokens go back to the original token layout (every original
    token gets a copy of the merged token that holds it): ``"auto"`` (default) at outputs that
    keep a token dimension and at layout ops that fold the tokens into a grid, ``"outputs"`` at
    outputs only, False nowhere (outputs hold merged tokens; a grid fold switches merging off).
    ``prop_attn``: proportional attention, True (the bias form for now), False, ``"bias"``
    (``log(size)`` as SDPA's ``attn_mask``) or ``"fold"`` (no mask: one more q/k channel, so
    fused mask-free kernels stay available); see ``passes.size_bias``.
    ``planned``: a ``Plan`` (``tome_fx.plan``, or another module's ``.tome``) to apply as it is,
    without searching: every process of a distributed job builds the module one process
    planned (``calibration`` then only serves as example inputs; give the same example inputs
    as there, their token count sets the scaling).
    ``min_tokens``: the fidelity floor, no sample (in a padded batch: by its own real
    tokens) is merged below that many tokens, at any length: short inputs merge less or not at
    all, with ``r`` and ``flops_budget`` alike (the budget search keeps it at the example inputs;
    ``Plan.notes`` says from which length it binds); ``"auto"`` (default): 24 for models taking
    token ids, 0 otherwise; 0 or None: no floor (``cost.floor``).
    A ``flops_budget`` that cannot be met because no block can merge is a ``UserWarning``.
    """
    common = dict(r=r, flops_budget=flops_budget, example_inputs=example_inputs,
                  prop_attn=prop_attn, compile=compile, strategy=strategy,
                  drop_unread=drop_unread, unmerge=unmerge, calibration=calibration,
                  planned=planned, min_tokens=min_tokens)
    given = OptimizeCall.set_by_user(**common)
    compile_options(compile)  # TypeError before the (slow) rewrite
    prop_attn_form(prop_attn)  # ValueError likewise
    check_mode(unmerge)
    common["min_tokens"] = check_min_tokens(min_tokens)
    common["calibration"], common["example_inputs"] = calibration_inputs(
        calibration, example_inputs, model)
    found = get_method(method)
    return found.optimize(model, OptimizeCall(**common, given=given, options=options))


def compile(model: nn.Module, *, backend: str = "inductor", mode: str | None = None,
            dynamic: bool | None = None, fullgraph: bool = True, **optimize_kwargs) -> nn.Module:
    """``optimize(model, **optimize_kwargs)`` compiled with ``torch.compile``.

    The result still exposes ``.tome`` (the plan) and ``.tome_counts``. ``dynamic`` is passed to
    torch.compile; leave it None (automatic): ``True`` would make the resolution symbolic too.
    """
    options = {"backend": backend, "mode": mode, "dynamic": dynamic, "fullgraph": fullgraph}
    return optimize(model, compile=options, **optimize_kwargs)


def explain(model: nn.Module, example_inputs: Any = None, r: Any = 1,
            drop_unread: bool = True) -> Plan:
    """What tome_fx finds in ``model``: blocks, protected tokens, skipped sites with reasons."""
    return rewrite(model, schedule_of(r), example_inputs, drop=drop_unread).plan


def export(module: nn.Module, path, example_inputs: Any = None, format: str | None = None, *,
           tolerance: float | None = None, verbose: bool = True) -> Exported:
    """Write ``module`` (what ``optimize`` returns, or any module ``torch.export`` traces) to
    ``path`` as ONNX (``.onnx``, needs the ``export`` extra) or a ``torch.export`` archive
    (``.pt2``); ``format`` defaults to the suffix. The file is loaded and run on
    ``example_inputs`` (default: those ``optimize`` captured the module with) and on one more
    batch size; the largest difference to the module's outputs is printed (``verbose``) and
    returned in ``Exported.max_diff``, and above ``tolerance`` (1e-4 for fp32) it is an
    ``ExportError``. The batch is dynamic, and so is every other dimension the module allows; a
    token count that depends on the input's values (ToMato threshold mode) is an ``ExportError``.
    A ``DiffusionModule`` becomes a ``.pt2`` a pipeline loads back (``diffusion.files``)."""
    from .diffusion.files import export_diffusion
    write = export_diffusion if isinstance(module, DiffusionModule) else export_module
    return write(module, path, example_inputs, format, tolerance=tolerance, verbose=verbose)
