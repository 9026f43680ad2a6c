"""Export a module to ONNX or a ``.pt2`` archive, then load the file, run it and compare.

``export(module, path)`` is meant for what ``optimize`` returns and takes any module
``torch.export`` can trace. Both formats come from one ``torch.export.export`` (non-strict) of
the module in eval mode under ``no_grad``; ONNX is ``torch.onnx.export(program, dynamo=True)``.

* **ATen only.** The merge kernels are Python over tensors and are traced through, so the
  program holds ATen ops and nothing of tome_fx: a ``.pt2`` loads where tome_fx is not
  installed. ``check_inputs`` (export-captured modules) runs once, at trace time, on the traced
  shapes; it is not in the file, whose own shape guards refuse other shapes instead.
* **Inputs and outputs.** The module's tensors in signature order (positional, then keyword),
  named after ``forward``'s parameters. Outputs are plain containers: a HuggingFace
  ``ModelOutput`` becomes a dict of its fields, so loading needs no transformers.
* **Dynamic dimensions.** Dimension 0 of the inputs is one dynamic ``batch``; every other
  dimension is ``Dim.AUTO``: dynamic where the module allows it (a token count that only meets
  per-token ops), static where it does not (a position table fixes the image size). Where that
  fails, batch only; where the module pins the batch, nothing (the result's notes say so).
  The ONNX file names them ``batch``, ``sequence``, ``height``, ``width`` (``graph.dims``).
* **Data-dependent token counts** (ToMato threshold mode, ToMato count mode with a padding
  mask) have no exported form: ``ExportError`` names the kernel line. ToMe with a padding mask
  lowers ``r`` when a block has too few same-group pairs: an unbacked size bounded by the
  schedule's ``r``, which torch.export and ONNX carry as a symbolic token count.
* **Checked.** The file is loaded (``torch.export.load`` / onnxruntime) and run on the example
  inputs and on one more batch size; the largest absolute difference to the module's outputs
  is reported, and above ``tolerance`` (1e-4 for fp32) it is an ``ExportError``. A file whose
  own guards refuse one of those sizes (a relation between sizes that torch.export keeps as a
  runtime check) is traced again with fewer dynamic dimensions, and the notes say so.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import traceback
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten_with_path

from .capture import default_inputs, is_exported_program, normalize_inputs
from .export_files import (export_format, load_runner, max_diff, output_tensors, quiet,
                           require_onnx, write_file)
from .errors import ExportError, one_line
from .graph.dims import axis_names, free_dims

TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}  # everything else: 1e-4
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote, and how the file's outputs compare with the module's."""

    path: str
    format: str  # "onnx" | "pt2"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: tuple[str, ...]  # "x[0]" (dimension 0 of input x), ...
    max_diff: dict  # checked inputs ("batch 2", "x[1]=31") -> largest |file - module| output
    tolerance: float
    notes: tuple[str, ...] = ()
    axes: tuple[str, ...] = ()  # the name of each ``dynamic`` dimension: "batch", "sequence"

    def __str__(self) -> str:
        runner = "onnxruntime" if self.format == "onnx" else "torch.export.load"
        diffs = ", ".join(f"{d:.2g} at {label}" for label, d in self.max_diff.items())
        size = os.path.getsize(self.path) / 1e6 if os.path.exists(self.path) else 0.0
        dims = [f"{d} ({a})" for d, a in zip(self.dynamic, self.axes)] or self.dynamic
        line = (f"wrote {self.path} ({self.format}, {size:.1f} MB): {runner} vs the module, max "
                f"|diff| {diffs} (tolerance {self.tolerance:g}); dynamic: "
                f"{', '.join(dims) or 'nothing'}")
        return "\n".join([line, *(f"note: {n}" for n in self.notes)])


def plain(out):
    """``out`` with mappings (a HuggingFace ``ModelOutput``) as dicts of their non-None fields
    and sequences as tuples/lists: containers any torch can rebuild."""
    if isinstance(out, Mapping):
        return {k: plain(v) for k, v in out.items() if v is not None}
    if isinstance(out, list):
        return [plain(v) for v in out]
    if isinstance(out, tuple):
        return tuple(plain(v) for v in out)
    return out


class _Flat(nn.Module):
    """``module`` as a function of its tensors in a fixed order, returning plain containers."""

    def __init__(self, module: nn.Module, n_args: int, keys: tuple[str, ...]):
        super().__init__()
        self.module, self.n_args, self.keys = module, n_args, keys

    def forward(self, *tensors):
        kwargs = dict(zip(self.keys, tensors[self.n_args:]))
        return plain(self.module(*tensors[:self.n_args], **kwargs))


def _input_names(module: nn.Module, n_args: int, keys) -> list[str]:
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"input_{i}" for i in range(n_args)] + list(keys)


def output_names(out) -> list[str]:
    names = []
    for path, leaf in tree_flatten_with_path(out)[0]:
        if isinstance(leaf, torch.Tensor):
            parts = [str(k.key if isinstance(k, MappingKey) else k.idx
                         if isinstance(k, SequenceKey) else k) for k in path]
            name = ".".join(parts) or "output"
            names.append(f"output_{name}" if name[0].isdigit() else name)
    return names


def _dynamic_shapes(tensors, batch: bool, free: bool):
    """Per input: dimension 0 the shared ``batch`` (inputs whose dimension 0 is the first
    input's), other dimensions ``Dim.AUTO`` if ``free``."""
    dim, size = torch.export.Dim("batch"), tensors[0].shape[0] if tensors[0].dim() else None
    specs = []
    for t in tensors:
        spec = {d: torch.export.Dim.AUTO for d in range(1 if batch else 0, t.dim())} if free else {}
        if batch and t.dim() and t.shape[0] == size:
            spec[0] = dim
        elif batch and t.dim():
            spec[0] = torch.export.Dim.AUTO
        specs.append(spec or None)
    return tuple(specs)


def _data_dependent(exc: BaseException | None):
    """The GuardOnDataDependentSymNode behind ``exc``, if any."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, GuardOnDataDependentSymNode):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _tome_fx_line(exc: BaseException) -> str | None:
    """``kernels/tomato.py:178 in tomato_merge: n_out = ...``: the innermost tome_fx frame."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if os.path.abspath(f.filename).startswith(_PACKAGE + os.sep)]
    if not frames:
        return None
    f = frames[-1]
    code = (f.line or "").split("  #")[0].strip()
    return f"{os.path.relpath(f.filename, _PACKAGE)}:{f.lineno} in {f.name}: {code}"


def refuse_data_dependent(exc: BaseException, module: nn.Module) -> None:
    """An ExportError naming the kernel line if ``exc`` comes from a data-dependent size."""
    guard = _data_dependent(exc)
    if guard is None:
        return
    plan = getattr(module, "tome", None)
    hint = ""
    if getattr(plan, "method", None) == "tomato" and getattr(plan, "sim_threshold", None) is not None:
        hint = ("; ToMato threshold mode keeps a per-image number of tokens: use "
                "method='tomato' with flops_budget= (an exact count per image) to export")
    where = _tome_fx_line(guard)
    what = "a token count" if where else "a size"
    raise ExportError(f"cannot export: {what} depends on the input's values, not only on its "
                      f"shape ({where or 'in the model code'}){hint}") from exc


def _foreign_calls(graph_module: torch.fx.GraphModule) -> list[str]:
    """Calls (in ``graph_module`` and its subgraphs) to functions of tome_fx: an exported
    program must have none, or it would need tome_fx to load."""
    found = []
    for gm in graph_module.modules():
        graph = getattr(gm, "graph", None)
        for n in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            where = getattr(n.target, "__module__", None) or ""
            if n.op == "call_function" and where.split(".")[0] == "tome_fx":
                found.append(f"{where}.{getattr(n.target, '__name__', n.target)}")
    return found


def refuse_foreign(ep) -> None:
    foreign = _foreign_calls(ep.graph_module)
    if foreign:
        raise ExportError(f"the exported program still calls tome_fx ({foreign[0]})")


def _trace(flat: _Flat, tensors: tuple, batch: bool, free: bool):
    traced = tensors
    if batch and tensors[0].dim() and tensors[0].shape[0] == 1:  # export specialises a size 1
        traced = tuple(t.expand(2, *t.shape[1:]).clone() if t.dim() and t.shape[0] == 1 else t
                       for t in tensors)
    with torch.no_grad():
        return torch.export.export(flat, traced, dynamic_shapes=(_dynamic_shapes(traced, batch, free),),
                                   strict=False)


def _example(module, example_inputs):
    if example_inputs is not None:
        return normalize_inputs(example_inputs)
    recorded = getattr(module, "tome_inputs", None)  # what optimize captured the module with
    if recorded is not None:
        return tuple(recorded[0]), dict(recorded[1])
    return normalize_inputs(default_inputs(module))


def export(module, path, example_inputs=None, format: str | None = None, *,
           tolerance: float | None = None, verbose: bool = True) -> Exported:
    """Write ``module`` to ``path`` as ONNX or a ``.pt2`` archive; load it, run it and compare
    (see the module docstring). Returns ``Exported``; prints it when ``verbose``."""
    fmt = export_format(path, format)
    if fmt == "onnx":
        require_onnx()
    if is_exported_program(module):
        module = module.module()
    module = getattr(module, "_orig_mod", module)  # torch.compile'd: export the module inside
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    args, kwargs = _example(module, example_inputs)
    tensors = (*args, *kwargs.values())
    bad = [type(t).__name__ for t in tensors if not isinstance(t, torch.Tensor)]
    if bad or not tensors:
        raise ExportError(f"export takes tensor inputs only, got {', '.join(bad) or 'none'}")
    with evaluating(module):
        return _export(module, str(path), fmt, args, kwargs, tolerance, verbose)


@contextlib.contextmanager
def evaluating(*modules: nn.Module):
    """``modules`` in eval mode, every submodule's mode restored after."""
    states = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in states:
            m.training = training


def _write_program(flat: _Flat, module, path: str, fmt: str, names, out_names, tensors,
                   expected):
    """Trace, write and run the file, from the most dynamic shapes to the least:
    (program, notes, {checked inputs: largest |file - module|}). A file whose own guards refuse
    a size it calls dynamic (a relation torch.export keeps as a runtime check, not a range) is
    written again with fewer dynamic dimensions."""
    errors, refused = [], None
    for batch, free in ((True, True), (True, False), (False, False)):
        try:
            with quiet():  # export prints partial graphs when it fails
                ep = _trace(flat, tensors, batch, free)
        except Exception as exc:  # export raises many kinds; the first says the most
            refuse_data_dependent(exc, module)
            errors.append(f"torch.export failed: {one_line(exc)}")
            continue
        refuse_foreign(ep)
        try:
            write_file(ep, path, fmt, names, out_names, tensors)
        except Exception as exc:  # torch.onnx raises many kinds too
            errors.append(f"writing {fmt} failed: {one_line(exc)}")
            continue
        diffs, refusal = _check_file(flat, ep, path, fmt, names, tensors, expected)
        if refusal:
            refused = refused or refusal
            continue
        notes = [] if batch else [f"the batch is static ({tensors[0].shape[0]}): the module pins it"]
        if refused:
            notes.insert(0, f"fewer dimensions are dynamic than the module allows: {refused}")
        return ep, notes, diffs
    if refused and not errors:
        errors.append(refused)
    raise ExportError(f"cannot export {type(module).__name__} to {fmt}: {errors[0]}")


def _check_file(flat: _Flat, ep, path: str, fmt: str, names, tensors, expected):
    """Load the written file and run it on each of ``_variants``: ({label: largest |file -
    module|}, None), or (None, why) where its guards refuse a variant. A file that fails on the
    example inputs is an ExportError."""
    run, diffs = load_runner(path, fmt, names), {}
    for label, inputs in _variants(ep, names, tensors):
        with torch.no_grad():
            want = output_tensors(flat(*inputs) if inputs is not tensors else expected)
        try:
            got = run(inputs)
        except Exception as exc:  # the program's guards, or onnxruntime's shape checks
            if inputs is tensors:
                raise ExportError(f"{path}: the written {fmt} file fails on the example "
                                  f"inputs: {one_line(exc)}") from exc
            return None, f"the file refused {label} ({one_line(exc)[:200]})"
        diffs[label] = max_diff(got, want, f"{path} at {label}")
    return diffs, None


def _variants(ep, names: list[str], tensors: tuple):
    """(label, inputs) to check the file on: the example inputs; one more sample where the
    batch is dynamic; one token fewer along each other dynamic dimension."""
    out = [(f"batch {tensors[0].shape[0]}", tensors)]
    for symbol, where in free_dims(ep, len(names)).items():
        i, d = where[0]
        size, low = tensors[i].shape[d], ep.range_constraints[symbol].lower
        if d == 0:
            more = list(tensors)
            for j, _ in where:
                more[j] = torch.cat([tensors[j], tensors[j][:1]])
            out.append((f"batch {size + 1}", tuple(more)))
        elif size - 1 >= low:
            fewer = list(tensors)
            for j, e in where:
                fewer[j] = tensors[j].narrow(e, 0, size - 1)
            out.append((f"{names[i]}[{d}]={size - 1}", tuple(fewer)))
    return out


def _export(module, path, fmt, args, kwargs, tolerance, verbose) -> Exported:
    flat = _Flat(module, len(args), tuple(kwargs))
    tensors = (*args, *kwargs.values())
    with torch.no_grad():
        expected = flat(*tensors)
    names, out_names = _input_names(module, len(args), kwargs), output_names(expected)
    ep, notes, diffs = _write_program(flat, module, path, fmt, names, out_names, tensors,
                                      expected)
    dynamic, axes = dynamic_axes(ep, names, tensors)
    result = Exported(path, fmt, tuple(names), tuple(out_names), dynamic, diffs,
                      tolerance_for(expected, tolerance), tuple(notes), axes)
    return checked(result, verbose)


def dynamic_axes(ep, names: list[str], tensors) -> tuple[tuple, tuple]:
    """(``x[0]``, ... each dynamic input dimension; ``batch``, ... their names)."""
    named = axis_names(ep, names, tensors)
    found = [(f"{names[i]}[{d}]", named[symbol])
             for symbol, where in free_dims(ep, len(names)).items() for i, d in where]
    return tuple(f for f, _ in found), tuple(a for _, a in found)


def tolerance_for(expected, tolerance: float | None = None) -> float:
    """``tolerance``, else by the outputs' floating dtype (1e-4 for fp32)."""
    out_dtype = next((t.dtype for t in output_tensors(expected) if t.is_floating_point()),
                     torch.float32)
    return tolerance if tolerance is not None else TOLERANCE.get(out_dtype, 1e-4)


def checked(result: Exported, verbose: bool) -> Exported:
    """``result``, printed if ``verbose``; an ExportError if a difference is above tolerance."""
    worst = max(result.max_diff.values())
    if not worst <= result.tolerance:
        raise ExportError(f"{result.path}: the {result.format} file's outputs differ from the "
                          f"module's by {worst:.3g} (tolerance {result.tolerance:g}); the file is "
                          "kept for inspection")
    if verbose:
        print(result)
    return result
