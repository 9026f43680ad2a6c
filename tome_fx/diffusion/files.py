"""A ``DiffusionModule`` as a ``.pt2`` archive that a pipeline loads back as its denoiser.

``export_pt2`` writes the rewritten graph (``torch.export``) as a program of the model's inputs
by their forward names, as keywords, every size ``Dim.AUTO``: dynamic where the graph is (the
batch, the latent's height and width, the text length). Outputs are plain dicts, so the program
loads without diffusers or tome_fx. The archive holds what a pipeline reads: ``config.json``
(the model's config), ``tome_fx.json`` (class, forward signature, inputs exported, output
class, sizes taken), ``plan.txt``. It is loaded with ``load_pt2`` and compared with the graph
on the example inputs, batch 1, one sample more, a latent ``GROW`` higher and ``GROW`` wider.

``load_pt2(path)``: a ``Pt2Denoiser``, called as the original model (positional or keyword,
``return_dict``, a scalar timestep made one per sample, optional inputs at None dropped), with
``config`` (a diffusers ``FrozenDict``), ``dtype``, ``device`` and ``.to(device)``.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import json
from types import MappingProxyType

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from ..capture.guards import export_spec
from ..errors import ExportError, ShapeError, one_line
from ..export_files import export_format, max_diff, output_tensors, quiet
from ..exporting import (Exported, checked, dynamic_axes, evaluating, output_names, plain,
                         refuse_data_dependent, refuse_foreign, tolerance_for)
from ..exporting import export as export_module
from .inputs import STEP_NAMES
from .module import bind_call, call_inputs

META, CONFIG, PLAN = "tome_fx.json", "config.json", "plan.txt"
FORMAT = 1  # version of tome_fx.json
GROW = 8  # the check grows the latent's height and width by this (SD's UNets take multiples of 8)


def export_diffusion(module, path, example_inputs=None, format: str | None = None, *,
                     tolerance: float | None = None, verbose: bool = True) -> Exported:
    """``tome_fx.export`` of a ``DiffusionModule``: ``export_pt2``, or its graph as ONNX."""
    if export_format(path, format) == "onnx":
        return export_module(module.graph, path, example_inputs, "onnx", tolerance=tolerance,
                             verbose=verbose)
    return export_pt2(module, path, example_inputs, tolerance=tolerance, verbose=verbose)


def export_pt2(module, path, example_inputs=None, *, tolerance: float | None = None,
               verbose: bool = True) -> Exported:
    """Write ``module`` (a ``DiffusionModule``) at ``example_inputs`` (default: ``optimize``'s)
    as a ``.pt2`` a pipeline loads; load it and compare (see the module docstring)."""
    path = str(path)
    model = module.model
    inputs = call_inputs(model, module.tome_inputs[1] if example_inputs is None else example_inputs)
    with evaluating(module, *module.graphs), torch.no_grad():
        out = module(**inputs)  # captures a graph for these inputs if none takes them
        graph = module.__dict__["_last"].module  # the graph that call ran
        graph = getattr(graph, "_orig_mod", graph)  # compiled: the module inside
        return _write(_program(graph, model, inputs), graph, model, inputs, out, path,
                      tolerance, verbose)


def _program(graph: nn.Module, model: nn.Module, inputs: dict) -> nn.Module:
    """``graph`` as a module whose ``forward`` takes ``inputs`` by the model's names (what
    torch.export reads to name the program's inputs), returning plain containers."""
    P = inspect.Parameter
    params = inspect.signature(model.forward).parameters
    names = [n for n in params if n in inputs]
    signature = inspect.Signature([P("self", P.POSITIONAL_OR_KEYWORD)]
                                  + [P(n, P.POSITIONAL_OR_KEYWORD) for n in names])

    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs).arguments
        bound.pop("self")
        return plain(self.model(**bound))

    forward.__signature__ = signature
    program = type(type(model).__name__, (nn.Module,), {"forward": forward})()
    program.model = graph  # not "graph": the loaded GraphModule has its own .graph
    return program


def _dims(value):
    """Every size of every tensor ``Dim.AUTO``: export keeps dynamic what the graph allows."""
    def spec(t):
        return {d: torch.export.Dim.AUTO for d in range(t.dim())} or None
    return tree_map(lambda v: spec(v) if isinstance(v, torch.Tensor) else None, value)


def _batch(inputs: dict) -> int:
    return next(v.shape[0] for v in tree_flatten(inputs)[0]
                if isinstance(v, torch.Tensor) and v.dim())


def _resized(inputs: dict, batch: int) -> dict:
    """``inputs`` at ``batch`` samples: tensors whose dimension 0 is the batch cut or repeated."""
    now = _batch(inputs)
    index = torch.arange(batch) % now

    def one(v):
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == now:
            return v.index_select(0, index.to(v.device))
        return v
    return tree_map(one, inputs)


def _trace(program: nn.Module, model: nn.Module, inputs: dict):
    # export specialises a size of 1: trace a batch of one as two
    traced = _resized(inputs, 2) if _batch(inputs) == 1 else inputs
    dims = {n: _dims(v) for n, v in traced.items()}
    try:  # export prints partial graphs when it fails
        with quiet(), torch.no_grad():
            ep = torch.export.export(program, (), traced, dynamic_shapes=dims, strict=False)
    except Exception as exc:  # export raises many kinds; the first line says the most
        refuse_data_dependent(exc, model)
        raise ExportError(f"cannot export {type(model).__name__} to pt2: torch.export failed: "
                          f"{one_line(exc)}") from exc
    refuse_foreign(ep)
    return ep


def _taken(ep) -> str:
    """The sizes the program takes, per input: ``sample (1..63, 4, 4.., 4..)``."""
    def one(d):
        return str(d) if isinstance(d, int) else f"{d[1]}..{'' if d[2] is None else d[2]}"
    users = set(ep.graph_signature.user_inputs)
    return ", ".join(f"{name} ({', '.join(map(one, dims))})"
                     for name, dims in export_spec(ep.graph_module, ep.range_constraints)
                     if name in users and dims is not None)


def _metadata(ep, model: nn.Module, inputs: dict, out) -> dict:
    params = inspect.signature(model.forward).parameters.values()
    output = type(out)
    return {"format": FORMAT, "class": type(model).__name__,
            "signature": [[p.name, p.kind.name, p.default is not p.empty] for p in params],
            "inputs": list(inputs),
            "dtypes": {n: str(v.dtype).replace("torch.", "") for n, v in inputs.items()
                       if isinstance(v, torch.Tensor)},
            "output": f"{output.__module__}.{output.__qualname__}",
            "takes": _taken(ep)}


def _config_json(model: nn.Module) -> str:
    config = getattr(model, "config", None) or {}
    return json.dumps(dict(config), default=lambda v: list(v) if isinstance(v, (set, tuple))
                      else str(v))


def _write(program, graph, model, inputs: dict, out, path: str, tolerance, verbose) -> Exported:
    ep = _trace(program, model, inputs)
    leaves = [v for v in tree_flatten(inputs)[0]
              if isinstance(v, torch.Tensor)]
    names = list(ep.graph_signature.user_inputs)
    plan = getattr(graph, "tome", None)
    torch.export.save(ep, path, extra_files={
        META: json.dumps(_metadata(ep, model, inputs, out)),
        CONFIG: _config_json(model), PLAN: "" if plan is None else str(plan)})
    diffs, notes = _check(load_pt2(path), program, inputs)
    dynamic, axes = dynamic_axes(ep, names, leaves)
    expected = plain(out)
    return checked(Exported(path, "pt2", tuple(names), tuple(output_names(expected)), dynamic,
                            diffs, tolerance_for(expected, tolerance), tuple(notes), axes),
                   verbose)


def _variants(inputs: dict):
    """(label, inputs) of the check; the latent is the first input of 4 or more dimensions."""
    batch = _batch(inputs)
    out = [(f"batch {batch}", inputs)]
    out += [(f"batch {b}", _resized(inputs, b)) for b in (1, batch + 1) if b != batch]
    name = next((n for n, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() >= 4),
                None)
    if name is not None:
        latent = inputs[name]
        for d in (-2, -1):
            size = latent.shape[d]
            index = (torch.arange(size + GROW) % size).to(latent.device)
            label = f"{name}[{latent.dim() + d}]={size + GROW}"
            out.append((label, {**inputs, name: latent.index_select(d, index)}))
    return out


def _check(loaded: "Pt2Denoiser", program: nn.Module, inputs: dict) -> tuple[dict, list]:
    """Largest |file - graph| per variant the graph takes; a note for each the file refuses."""
    diffs, notes = {}, []
    for label, variant in _variants(inputs):
        try:
            with torch.no_grad():
                want = output_tensors(program(**variant))
        except ShapeError:  # the graph itself does not take this size: neither does the file
            continue
        try:
            with torch.no_grad():
                got = output_tensors(loaded(**variant, return_dict=False))
        except Exception as exc:  # its guards (ShapeError), or an op that fails at this size
            if variant is inputs:
                raise ExportError(f"{loaded.path}: the written pt2 file fails on the example "
                                  f"inputs: {one_line(exc)}") from exc
            notes.append(f"the file refuses {label}, which the module takes ({one_line(exc)})")
            continue
        diffs[label] = max_diff(got, want, f"{loaded.path} at {label}")
    return diffs, notes


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def load_pt2(path) -> "Pt2Denoiser":
    """The denoiser in a ``.pt2`` that ``tome_fx.export`` wrote for a diffusion model, as a
    module a diffusers pipeline uses as ``pipe.unet`` / ``pipe.transformer``."""
    path = str(path)
    extra = {META: "", CONFIG: "", PLAN: ""}
    try:
        ep = torch.export.load(path, extra_files=extra)
    except Exception as exc:
        raise ExportError(f"cannot read {path} as a torch.export archive: {one_line(exc)}") \
            from exc
    if not extra[META]:
        raise ExportError(f"{path} is not a diffusion model's .pt2 from tome_fx.export (no "
                          f"{META}): load it with torch.export.load({path!r}).module()")
    meta = json.loads(extra[META])
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}: {META} format {meta.get('format')} is not {FORMAT}: export "
                          "it again with this tome_fx")
    return Pt2Denoiser(path, ep, meta, json.loads(extra[CONFIG] or "{}"), extra[PLAN])


def _frozen(config: dict):
    try:
        from diffusers.configuration_utils import FrozenDict
    except ImportError:  # no pipeline to read it: read-only all the same
        return MappingProxyType(config)
    return FrozenDict(config)


class Pt2Denoiser(nn.Module):
    """A diffusion model's program loaded from a ``.pt2`` (``load_pt2``), called as the model:
    ``.program`` the loaded program, ``.config`` the model's config, ``.tome`` the plan (text).
    Inputs the file was not exported with, sizes it does not take and other dtypes are one-line
    errors."""

    def __init__(self, path: str, ep, meta: dict, config: dict, plan: str):
        super().__init__()
        P = inspect.Parameter
        params = [P(n, getattr(P, kind), default=(True if n == "return_dict" else None)
                    if optional else P.empty) for n, kind, optional in meta["signature"]]
        self.__dict__.update(path=path, _ep=ep, _meta=meta, _signature=inspect.Signature(params),
                             config=_frozen(config), tome=plan)
        self.program = ep.module()
        self.training = False

    def train(self, mode: bool = True):
        if mode:  # the program was traced in eval mode; dropout and the like are gone
            raise RuntimeError(f"{self.path} holds an inference program: it runs in eval mode "
                               "only (train the original model)")
        return self

    @property
    def dtype(self) -> torch.dtype:
        first = next(self._tensors(), None)
        return first.dtype if first is not None else torch.float32

    @property
    def device(self) -> torch.device:
        first = next(self._tensors(), None)
        return first.device if first is not None else torch.device("cpu")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
        value = getattr(self._skeleton(), name, None)  # AttributeError below if it has none
        if value is None or inspect.ismethod(value):  # a method would change a copy, silently
            raise AttributeError(f"{self._meta['class']} loaded from {self.path} has no "
                                 f"{name!r}: a .pt2 is a fixed program (do it to the model, "
                                 "then optimize and export)")
        return value

    def _skeleton(self):
        """The model's class built from the config on the meta device, no weights: what a
        pipeline reads besides the config (SDXL's ``add_embedding.linear_1.in_features``)."""
        if "_shape" not in self.__dict__:
            self.__dict__["_shape"] = None
            try:
                import diffusers

                with torch.device("meta"):
                    cls = getattr(diffusers, self._meta["class"])
                    self.__dict__["_shape"] = cls.from_config(dict(self.config)).eval()
            except Exception:  # another class or config: the attribute reads fail, one line
                pass
        return self.__dict__["_shape"]

    def _tensors(self):
        return (t for t in itertools.chain(self.program.parameters(), self.program.buffers())
                if t.is_floating_point())

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ``.half()``: the device moves (torch.export's device pass);
        the dtype is the one the file was exported in."""
        probe = fn(torch.zeros((), dtype=self.dtype, device=self.device))
        if probe.dtype != self.dtype:
            raise TypeError(f"{self.path} holds a {self.dtype} program, whose dtype cannot change "
                            f"after export: optimize and export the model in {probe.dtype}")
        if probe.device != self.device:
            try:
                from torch.export.passes import move_to_device_pass
            except ImportError:
                raise RuntimeError(f"this torch cannot move a loaded program to {probe.device}: "
                                   f"export the model on {probe.device}") from None
            ep = move_to_device_pass(self._ep, probe.device)
            self.__dict__["_ep"] = ep
            self.program = ep.module()
        return self

    def forward(self, *args, **kwargs):
        inputs, return_dict = bind_call(self._signature, args, kwargs,
                                        f"{self._meta['class']}.forward ({self.path})")
        out = self._run(inputs)
        if return_dict is False:
            return tuple(out.values())
        return _output_class(self._meta["output"], out)

    def _run(self, inputs: dict) -> dict:
        meta, path = self._meta, self.path
        exported = meta["inputs"]
        extra = [n for n in inputs if n not in exported]
        if extra:
            raise ShapeError(f"{path} was exported without the input {extra[0]!r}: export the "
                             f"module with example inputs that include {extra[0]} (tome_fx."
                             f"export(module, path, example_inputs={{..., {extra[0]!r}: ...}}))")
        missing = [n for n in exported if n not in inputs]
        if missing:
            raise ShapeError(f"{path} was exported with the input {missing[0]!r}: pass it, or "
                             f"export the module with example inputs without it")
        for n, want in meta["dtypes"].items():
            got, want = inputs[n].dtype, getattr(torch, want)
            if got == want or (n in STEP_NAMES and not want.is_floating_point):
                continue  # a program traced with an integer timestep casts it itself
            if n not in STEP_NAMES:
                raise TypeError(f"input {n!r} is {got} but {path} was exported for {want}: "
                                f"export the module with {got} inputs")
            inputs[n] = inputs[n].to(want)  # as the model does: it takes the timestep as float
        try:
            return self.program(**inputs)
        except (AssertionError, ValueError) as exc:  # the program's guards, its input spec
            shapes = ", ".join(f"{n} {tuple(v.shape)}" for n, v in inputs.items()
                               if isinstance(v, torch.Tensor))
            raise ShapeError(f"{path} does not take these inputs ({shapes}): {one_line(exc)}; "
                             f"it takes {meta['takes']}: export the module with example inputs "
                             "of these sizes") from None


def _output_class(name: str, out: dict):
    """The model's output class (diffusers') around ``out`` where it imports, else the dict."""
    module, _, cls = name.rpartition(".")
    if not module.startswith("diffusers."):  # import only what a pipeline has imported anyway
        return out
    try:
        return getattr(importlib.import_module(module), cls)(**out)
    except (ImportError, AttributeError, TypeError):
        return out
