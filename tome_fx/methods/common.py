"""What every method's ``optimize`` shares: the model check, calibration inputs, and the
finish (the unmet-budget warning, ``tome_counts``, compiling)."""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn as nn

from ..capture import Captured, is_exported_program, normalize_inputs
from ..compiling import finish_module
from ..data import Data, load_data
from ..graph.batches import fit_batch, static_batch
from ..pipeline import Rewrite
from ..plans import Plan


def check_model(model) -> None:
    if not isinstance(model, nn.Module) and not is_exported_program(model):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


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


def finish(result: Rewrite, compile: bool | dict, budget: float | None = None,
           captured: Captured | None = None) -> nn.Module:
    """The rewritten module, compiled if asked; a UserWarning where ``budget`` is not met."""
    why = unmet_budget(result.plan, budget)
    if why:
        # stacklevel: finish <- the method's optimize <- api.optimize <- the caller
        warnings.warn(why, UserWarning, stacklevel=4)
    out = result.graph_module
    out.tome_counts = result.counts
    return finish_module(out, compile, captured)
