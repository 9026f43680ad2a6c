"""Capture a model as a torch.fx GraphModule, once per ``optimize`` call.

Symbolic tracing (``capture.fx``) in eval mode on a deep copy of the user's model first. When
that fails (HuggingFace transformers v5 models), or the model is given as a
``torch.export.ExportedProgram``, the graph comes from torch.export instead (``capture.export``);
``Captured.frontend`` says which. The user's model is never modified.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..errors import CaptureError, one_line
from .export import capture_export, exported_inputs, is_exported_program
from .fx import float_mask, trace, with_standins
from .inputs import default_inputs, normalize_inputs

__all__ = ["Captured", "capture", "default_inputs", "normalize_inputs", "is_exported_program",
           "float_mask"]


@dataclass
class Captured:
    """A traced copy of a model plus what capture noticed."""

    graph_module: fx.GraphModule
    frontend: str  # "fx" (symbolic tracing) | "export" (torch.export, ATen-level graph)
    model_class: str
    args: tuple  # example positional inputs (tensors) matching the graph placeholders
    kwargs: dict
    notes: list[str] = field(default_factory=list)

    def copy(self) -> "Captured":
        """A copy whose graph can be rewritten without touching this one."""
        return dataclasses.replace(self, graph_module=copy.deepcopy(self.graph_module),
                                   notes=list(self.notes))


def _export_without_cache(work: nn.Module, args, kwargs, name: str, notes: list[str]):
    """``capture_export``; a HuggingFace decoder whose output holds a key/value cache (not a
    tensor) is exported again with ``config.use_cache = False`` on the copy."""
    try:
        return capture_export(work, args, kwargs, name, notes)
    except CaptureError as exc:
        config = getattr(work, "config", None)
        if "Cache" not in str(exc) or not getattr(config, "use_cache", False):
            raise
        config.use_cache = False
        notes.append("captured with use_cache=False: the model's key/value cache is no tensor")
        return capture_export(work, args, kwargs, name, notes)


def capture(model: nn.Module, example_inputs: Any = None) -> Captured:
    """Capture a deep copy of ``model`` (in eval mode) as a GraphModule.

    torch.fx symbolic tracing first (``frontend="fx"``); if that fails, or ``model`` is a
    ``torch.export.ExportedProgram``, torch.export (``frontend="export"``).
    ``example_inputs`` default to the model's declared input size (``default_inputs``).
    """
    if is_exported_program(model):
        args, kwargs = (normalize_inputs(example_inputs) if example_inputs is not None
                        else exported_inputs(model))
        notes = ["captured from the given torch.export ExportedProgram"]
        gm = capture_export(model, args, kwargs, "ExportedProgram", notes)
        return Captured(gm, "export", "ExportedProgram", args, kwargs, notes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        example_inputs = default_inputs(model)
    args, kwargs = normalize_inputs(example_inputs)
    name = type(model).__name__
    notes: list[str] = []
    work = with_standins(copy.deepcopy(model).eval(), notes)
    try:
        gm = trace(work, args, kwargs)
    except Exception as exc:  # fx raises many kinds; report them as one line
        reason = one_line(exc)
        try:
            gm = _export_without_cache(work, args, kwargs, name, notes)
        except CaptureError as exc2:
            raise CaptureError(f"cannot trace {name} with torch.fx: {reason}; {exc2}") from exc
        notes.insert(0, f"captured with torch.export: torch.fx cannot trace {name} ({reason})")
        return Captured(gm, "export", name, args, kwargs, notes)
    return Captured(gm, "fx", name, args, kwargs, notes)
