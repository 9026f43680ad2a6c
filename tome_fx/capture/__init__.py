"""Capture a model as a torch.fx GraphModule, once per ``optimize`` call.

Symbolic tracing (``capture.fx``) on a deep copy of the user's model first. When that fails
(HuggingFace transformers v5 models), or the model is given as a
``torch.export.ExportedProgram``, the graph comes from torch.export instead (``capture.export``);
``Captured.frontend`` says which.

The copy first runs on the example inputs in train mode (``capture.train.probe_training``),
and in eval mode where that fails or the forward depends on the mode. Inputs the model cannot
take are a one-line ``CaptureError`` naming why (``capture.inputs.run_example``). A forward
that depends on the mode through dropout or HuggingFace's SpecAugment (which the copy draws
through an op, ``capture.specaug``) is recorded in train mode, both switched by
``.train()``/``.eval()``; one that does not, or whose training forward a graph cannot hold, in
eval mode (a plan note and a warning on ``.train()`` say why). torch prints nothing while
capture tries (``capture.quiet``). The user's model is never modified.

One copy of the weights: the copy shares the model's parameters (``nn.Parameter`` objects, so
the same storage, as ``torch.compile``): its modules, attributes and buffers are copied, its
parameters are not (``graph.module.shared_parameters``); likewise every later copy (export's,
each rewrite round's: ``Captured.copy``). The module ``optimize`` returns computes with the
model's own parameters: training it trains the model, ``.to(dtype)`` converts the model's. Buffers stay copies: capture runs the
copy in train mode, where batch norm updates its running statistics in place (put back after,
``capture.train``), and a buffer is small beside the weights. Nothing capture or a pass does
writes a parameter: ``capture.train`` puts back buffers only, and the passes add graph nodes
(the fold of proportional attention computes new q/k from the activations, not new weights).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..errors import CaptureError, ShapeError, one_line
from .baddbmm import split_baddbmm
from ..graph.module import shared_parameters
from .export import capture_export, exported_inputs, is_exported_program
from .fx import float_mask, trace, with_standins
from .inputs import default_inputs, normalize_inputs, run_example
from .guards import check_inputs
from .merged import refuse_merged
from .positions import past_table, shorter
from .quiet import quiet
from .specaug import swap_spec_augment
from .train import probe_training, train_problem

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
    training: bool = False  # the mode the model was given in (the result is returned in it)

    def copy(self) -> "Captured":
        """A copy whose graph can be rewritten without touching this one; its parameters are
        this one's (the model's), not copies."""
        gm = copy.deepcopy(self.graph_module, shared_parameters(self.graph_module))
        return dataclasses.replace(self, graph_module=gm, notes=list(self.notes))


def _export_without_cache(work: nn.Module, args, kwargs, name: str, notes: list[str],
                          training: bool = False):
    """``capture_export``; a HuggingFace decoder whose output holds a key/value cache (not a
    tensor) is exported again with ``config.use_cache = False`` on the copy."""
    try:
        return capture_export(work, args, kwargs, name, notes, training)
    except CaptureError as exc:
        config = getattr(work, "config", None)
        if "Cache" not in str(exc) or not getattr(config, "use_cache", False):
            raise
        config.use_cache = False
        notes.append("captured with use_cache=False: the model's key/value cache is no tensor")
        return capture_export(work, args, kwargs, name, notes, training)


def _both_modes(capture_in, probe, reference, args: tuple, kwargs: dict):
    """(graph, notes, why): ``capture_in(training, notes)``'s train-mode graph where the forward
    depends on the mode (``probe``), nothing rules it out and under ``.eval()`` it is the
    model's eval forward (``why`` None); else its eval-mode graph, and why where the training
    forward is not captured. Raises what the eval-mode capture raises."""
    why, notes = probe.why, []
    if why is None and probe.differs:
        try:
            gm = capture_in(True, notes)
            why = train_problem(gm, reference, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure in train mode: the eval-mode graph
            why = f"it cannot be captured in train mode ({one_line(exc)})"
        if why is None:
            return gm, notes, None
        notes = []
    return capture_in(False, notes), notes, why


def _refuse_past_table(model: nn.Module, args: tuple, kwargs: dict, exc: Exception) -> None:
    """A ``ShapeError`` if the inputs the model failed on are longer than a position table
    holds, found in the model captured on fewer tokens (``capture.positions``)."""
    short = shorter(args, kwargs)
    if short is None or (short[0] and short[1]):  # example_inputs are positional or keyword
        return
    try:
        gm = capture(model, short[0] or short[1], lengths=False).graph_module
        given = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except Exception:  # noqa: BLE001 - not even shorter inputs: the model's own error stands
        return
    spec = next((n.args[0] for n in gm.graph.nodes if n.op == "call_function"
                 and n.target is check_inputs), ())
    why = past_table(spec, dict(given))
    if why:
        raise ShapeError(f"{type(model).__name__} cannot take the example inputs: {why}") from exc


def capture(model: nn.Module, example_inputs: Any = None, image_sizes: bool = False,
            lengths: bool = True) -> Captured:
    """Capture a deep copy of ``model`` as a GraphModule (in eval mode; see the module
    docstring for train mode) that holds the model's parameters, not copies (the module
    docstring, "One copy of the weights").

    torch.fx symbolic tracing first (``frontend="fx"``); if that fails, or ``model`` is a
    ``torch.export.ExportedProgram``, torch.export (``frontend="export"``).
    ``example_inputs`` default to the model's declared input size (``default_inputs``).
    ``image_sizes``: the height and width of 4-D inputs are exported as dynamic too, where the
    model allows (a diffusion model's latent); export's guards refuse the sizes it does not.
    A model tome_fx has merged already is a ``MergedError`` (``capture.merged``), example
    inputs longer than a position table holds a ``ShapeError`` naming it (``lengths``: found
    by a capture on fewer tokens).
    """
    refuse_merged(model)
    if is_exported_program(model):
        args, kwargs = (normalize_inputs(example_inputs) if example_inputs is not None
                        else exported_inputs(model))
        notes = ["captured from the given torch.export ExportedProgram"]
        with quiet():
            gm = capture_export(model, args, kwargs, "ExportedProgram", notes)
        return Captured(gm, "export", "ExportedProgram", args, kwargs, notes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        example_inputs = default_inputs(model)
    args, kwargs = normalize_inputs(example_inputs)
    name = type(model).__name__
    # the copy both frontends record (stand-ins swapped in it), the model's parameters in it
    work = copy.deepcopy(model, shared_parameters(model))
    if image_sizes:
        work._tome_image_sizes = True  # read by capture.export.interpolates
    swap_spec_augment(work)
    with quiet():
        probe = probe_training(work, args, kwargs)
    # the eval forward: the model's own error on inputs it cannot take, else what a train-mode
    # graph must compute under .eval()
    try:
        reference = run_example(work, args, kwargs) if probe.error or probe.differs else None
    except CaptureError as exc:
        if lengths:  # a position table the inputs are too long for: say so
            _refuse_past_table(model, args, kwargs, exc)
        raise

    def in_mode(training: bool) -> nn.Module:
        return work.train(training)

    with quiet():
        try:
            gm, notes, why = _both_modes(
                lambda training, notes: trace(with_standins(in_mode(training), notes), args,
                                              kwargs), probe, reference, args, kwargs)
            frontend = "fx"
        except Exception as exc:  # fx raises many kinds; report them as one line
            reason = one_line(exc)
            try:
                gm, notes, why = _both_modes(
                    lambda training, notes: _export_without_cache(
                        in_mode(training), args, kwargs, name, notes, training),
                    probe, reference, args, kwargs)
            except CaptureError as exc2:
                raise CaptureError(f"cannot trace {name} with torch.fx: {reason}; {exc2}") from exc
            notes.insert(0, f"captured with torch.export: torch.fx cannot trace {name} ({reason})")
            frontend = "export"
    if split_baddbmm(gm):  # classic attention processors: logits the matcher reads
        notes.append("baddbmm attention logits read as a product (and a mask)")
    if why:
        gm.tome_eval_only = f"the training forward of {name} is not captured: {why}"
        notes.append(f"train mode: {why}; under .train() the module computes the graph "
                     "recorded in eval mode")
    return Captured(gm, frontend, name, args, kwargs, notes, model.training)
