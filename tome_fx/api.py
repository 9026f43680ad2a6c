"""Public entry points: ``optimize``, ``compile``, ``explain``, ``plan``, ``rewrite``, ``export``.

Each captures the model once (``capture``), then runs the one rewrite (``pipeline``) with a
method (``methods``), under a schedule from the cost model (``cost``) for a FLOP budget.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any

import torch
import torch.nn as nn

from .capture import Captured, capture, is_exported_program, normalize_inputs
from .compiling import compile_options, finish_module
from .cost import STRATEGIES, CostModel, check_budget, search, to_plan
from .cost.floor import apply_floor, check_min_tokens, resolve_min_tokens
from .cost.tomato import rewrite_tomato
from .cost.tomesd import rewrite_tomesd
from .data import Data, load_data
from .diffusion import DiffusionModule, build_tomesd, call_inputs, is_diffusers
from .diffusion import default_inputs as diffusion_inputs
from .exporting import Exported
from .exporting import export as export_module
from .graph.batches import fit_batch, static_batch
from .methods import ToMato, ToMe
from .methods.tomato import check_args as check_tomato_args
from .methods.tomesd import from_options as tomesd_method
from .passes.size_bias import prop_attn_form
from .passes.unmerge import check_mode
from .pipeline import Rewrite
from .pipeline import rewrite as run_pipeline
from .plans import Plan
from .schedule import parse_r
from .todo_front import optimize_todo

TOMATO_ARGS = ("sim_threshold", "similarity", "block", "grid")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module) and not is_exported_program(model):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_args(model, r, flops_budget):
    _check_model(model)
    if r is not None and flops_budget is not None:
        raise ValueError("pass either r or flops_budget, not both")
    if r is None and flops_budget is None:
        raise ValueError("pass r (tokens merged per block) or flops_budget")
    if flops_budget is not None:
        check_budget(flops_budget)  # ValueError/TypeError naming the value


def _schedule(r):
    """``r`` as ``parse_r`` reads it, for any number of blocks."""
    return lambda n: parse_r(r, n)


def _padded(schedule: list[int]):
    return lambda n: list(schedule) + [0] * (n - len(schedule))


def rewrite(model: nn.Module, schedule_fn, example_inputs=None, prop_attn: bool | str = True,
            drop: bool = True, unmerge: str | bool = "auto") -> Rewrite:
    """Capture ``model`` and rewrite it with ToMe; ``schedule_fn(num_blocks) -> list[int]``
    gives r per block (see ``pipeline.rewrite``)."""
    return run_pipeline(capture(model, example_inputs), ToMe(schedule_fn, unmerge=unmerge),
                        prop_attn=prop_attn, drop=drop)


def calibration_inputs(calibration: Any, example_inputs: Any, model=None) -> tuple[Any, Any]:
    """(``calibration`` as inputs, the example inputs): a ``Data`` is all of it as one batch, a
    path is ``load_data(path, model)``, inputs stay as they are, None stays None; the example
    inputs are the calibration inputs where none are given (as many as an ExportedProgram fixed
    at one batch takes)."""
    if isinstance(calibration, (str, os.PathLike)):
        calibration = load_data(calibration, model)
    if isinstance(calibration, Data):
        calibration = calibration.inputs()
    fixed = static_batch(model) if example_inputs is None and calibration is not None else None
    if fixed:  # captured at its one batch; calibration runs in chunks of it (cost.calibrate)
        return calibration, fit_batch(calibration, fixed)
    return calibration, calibration if example_inputs is None else example_inputs


def check_calibration(captured: Captured, calibration: Any) -> tuple | None:
    """(args, kwargs) of ``calibration``, which must match the example inputs but for the batch."""
    if calibration is None:
        return None
    args, kwargs = normalize_inputs(calibration)
    want = [(k, v) for k, v in enumerate(captured.args)] + list(captured.kwargs.items())
    have = dict(enumerate(args)) | kwargs
    for key, ref in want:
        got = have.get(key)
        if isinstance(ref, torch.Tensor) and (not isinstance(got, torch.Tensor)
                                              or tuple(got.shape[1:]) != tuple(ref.shape[1:])):
            shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(f"calibration input {key!r} is {shape}; it must have the example "
                             f"inputs' shape {list(ref.shape)} apart from the batch (pass it as "
                             f"example_inputs too, or leave example_inputs out)")
    return args, kwargs


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


def plan(model: nn.Module, flops_budget: float, example_inputs: Any = None,
         strategy: str = "auto", prop_attn: bool | str = True, drop: bool = True,
         unmerge: str | bool = "auto", calibration: Any = None, min_tokens="auto") -> Plan:
    """A merge schedule whose FLOPs are at most ``flops_budget`` times the original's
    (``min_tokens``: the fidelity floor, see ``optimize``).

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


def optimize(
    model: nn.Module,
    *,
    r: Any = None,
    flops_budget: float | None = None,
    example_inputs: Any = None,
    prop_attn: bool | str = True,
    compile: bool | dict = False,
    strategy: str = "auto",
    method: str = "tome",
    drop_unread: bool = True,
    unmerge: str | bool = "auto",
    calibration: Any = None,
    planned: Plan | None = None,
    min_tokens: int | str | None = "auto",
    **tomato: Any,
) -> nn.Module:
    """Return ``model`` with Token Merging inserted in every attention->MLP block: a new module
    computing with the model's own parameters (one copy of the weights, as ``torch.compile``;
    buffers are its own), ``model`` itself unchanged.

    ``r``: int (same every block), list (per block, padded with 0) or ``(r, inflect)``.
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
    ``method="tomato"`` merges once instead (``sim_threshold``, ``similarity``, ``block``,
    ``grid``: see ``tome_fx.methods.tomato.ToMato``).
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
    ``min_tokens`` (ToMe): the fidelity floor, no sample (in a padded batch: by its own real
    tokens) is merged below that many tokens, at any length: short inputs merge less or not at
    all, with ``r`` and ``flops_budget`` alike (the budget search keeps it at the example inputs;
    ``Plan.notes`` says from which length it binds); ``"auto"`` (default): 24 for models taking
    token ids, 0 otherwise; 0 or None: no floor (``cost.floor``).
    A ``flops_budget`` that cannot be met because no block can merge is a ``UserWarning``.
    """
    compile_options(compile)  # TypeError before the (slow) rewrite
    prop_attn_form(prop_attn)  # ValueError likewise
    check_mode(unmerge)
    min_tokens = check_min_tokens(min_tokens)
    calibration, example_inputs = calibration_inputs(calibration, example_inputs, model)
    if planned is not None and method != "tome":
        raise ValueError(f"planned= takes a ToMe plan (method='tome'), not method={method!r}")
    if method == "tomato":
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if r is not None:
            raise ValueError("method='tomato' takes sim_threshold or flops_budget, not r")
        unknown = sorted(set(tomato) - set(TOMATO_ARGS))
        if unknown:
            raise TypeError(f"unexpected arguments for method='tomato': {', '.join(unknown)}")
        found = ToMato(**{k if k != "sim_threshold" else "threshold": v for k, v in tomato.items()})
        check_tomato_args(found.threshold, flops_budget, found.similarity, found.block, found.grid)
        if found.threshold is not None and not prop_attn:
            raise ValueError("ToMato threshold mode needs prop_attn=True: its log(size) bias is "
                             "what keeps padding tokens (size 0) out of attention")
        captured = capture(model, example_inputs)
        result = rewrite_tomato(captured, found, flops_budget, prop_attn, drop_unread)
        return _finish(result, compile, flops_budget, captured)
    if method == "tomesd":  # local merging in diffusion models (ToMeSD)
        ignored = {"prop_attn": prop_attn in ("bias", "fold"), "strategy": strategy != "auto",
                   "calibration": calibration is not None}
        return _optimize_tomesd(model, r, flops_budget, example_inputs, compile, tomato,
                                [k for k, v in ignored.items() if v])
    if method == "todo":  # temporary: the plug-in registry replaces this branch
        return optimize_todo(model, flops_budget=flops_budget, example_inputs=example_inputs,
                             compile=compile, options={**tomato, "prop_attn": prop_attn == "fold"},
                             unused=[k for k, v in (("r", r), ("calibration", calibration)) if v])
    if method != "tome":
        raise ValueError(f"method must be 'tome', 'tomato', 'tomesd' or 'todo', got {method!r}")
    if tomato:
        raise TypeError(f"unexpected arguments for method='tome': {', '.join(sorted(tomato))}")
    if planned is not None:  # the schedule is given: no r and no search
        _check_model(model)
        if r is not None:
            raise ValueError("pass either r or planned, not both")
        if not isinstance(planned, Plan):
            raise TypeError(f"planned must be a tome_fx.Plan, got {type(planned).__name__}")
        if flops_budget is not None:
            check_budget(flops_budget)
        captured = capture(model, example_inputs)
        result = apply_floor(rewrite_planned(captured, planned, prop_attn, drop_unread, unmerge),
                             resolve_min_tokens(min_tokens, (captured.args, captured.kwargs)))
        return _finish(result, compile, flops_budget, captured)
    _check_args(model, r, flops_budget)
    if r is not None:
        parse_r(r, 1 if not isinstance(r, list) else max(len(r), 1))  # type/range errors early
    captured = capture(model, example_inputs)  # the one capture of this call
    min_tokens = resolve_min_tokens(min_tokens, (captured.args, captured.kwargs))
    if flops_budget is not None:  # schedule from the cost model (tome_fx.plan)
        result = rewrite_for_budget(captured, flops_budget, prop_attn, strategy, drop_unread,
                                    unmerge, calibration, min_tokens)
    else:
        result = apply_floor(run_pipeline(captured, ToMe(_schedule(r), unmerge=unmerge),
                                          prop_attn=prop_attn, drop=drop_unread), min_tokens)
    return _finish(result, compile, flops_budget, captured)


def _optimize_tomesd(model, r, flops_budget, example_inputs, compile, options,
                     unused) -> nn.Module:
    """``optimize(method="tomesd")``: a diffusers model gets default inputs from its config and
    comes back as a ``DiffusionModule`` a pipeline can call, which captures again for calls
    its graphs do not take (``diffusion.module``). ``unused``: ToMe's arguments the call set,
    which ToMeSD has no use for (an error, not silently ignored)."""
    _check_model(model)
    if r is not None:
        raise ValueError("method='tomesd' takes ratio or flops_budget, not r")
    if unused:
        raise ValueError(f"method='tomesd' takes no {unused[0]}: it merges locally, without "
                         "proportional attention, and a budget picks its levels and ratios")
    if flops_budget is not None:
        check_budget(flops_budget)
    found = tomesd_method(options, flops_budget is not None)
    wrap = isinstance(model, nn.Module) and is_diffusers(model)
    if not wrap:
        captured = capture(model, example_inputs)
        return _finish(rewrite_tomesd(captured, found, flops_budget), compile, flops_budget,
                       captured)
    inputs = call_inputs(model, diffusion_inputs(model) if example_inputs is None
                         else example_inputs)
    first = build_tomesd(found, flops_budget, compile, model, inputs)
    if flops_budget is not None:  # other calls keep the levels and ratios the budget chose
        found = dataclasses.replace(found, ratio={lv.downsample: lv.ratio
                                                  for lv in first.tome.levels})
    return DiffusionModule(model, functools.partial(build_tomesd, found, None, compile),
                           inputs, first)


def unmet_budget(plan: Plan, budget: float | None) -> str | None:
    """Why the module for ``plan`` does not meet ``budget`` (one line), or None if it does."""
    if budget is None or (plan.ratio is not None and plan.ratio <= budget):
        return None
    got = "the model is unchanged" if plan.ratio is None else f"its FLOP ratio is {plan.ratio:.4f}"
    if plan.skipped:
        first = plan.skipped[0]
        why = (f"{len(plan.skipped)} attention site(s) cannot merge, e.g. {first.site}: "
               f"{first.reason}")
    else:
        why = "no attention->MLP block was found to merge"
    return f"flops_budget={budget:g} is not met ({got}): {why} (every reason: print(module.tome))"


def _finish(result: Rewrite, compile: bool | dict, budget: float | None = None,
            captured: Captured | None = None) -> nn.Module:
    why = unmet_budget(result.plan, budget)
    if why:
        warnings.warn(why, UserWarning, stacklevel=3)
    out = result.graph_module
    out.tome_counts = result.counts
    return finish_module(out, compile, captured)


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
    return rewrite(model, _schedule(r), example_inputs, drop=drop_unread).plan


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
