"""A rewritten diffusers model that drops into a pipeline
(``pipe.unet = tome_fx.optimize(pipe.unet, method="tomesd", ratio=0.5)``) and behaves as the
model it replaces, for every call the pipeline makes.

It owns the real model, as ``torch.compile``'s result does: attributes, ``config``, ``dtype``
and methods are the model's, and the rewritten graphs use the model's own parameters. Graphs
are captured per *call signature* (which optional inputs are given, their nesting, the
non-tensor values such as a LoRA ``scale``, tensor ranks, dtypes and devices) and kept in a
cache, the way torch.compile guards and recompiles:

* a call whose inputs a cached graph takes (its batch and, where export kept them symbolic,
  the latent's height and width are dynamic) runs it;
* otherwise (a new optional input, a size the graph's guards refuse, e.g. a latent side that is
  not a multiple of 8 on a UNet) the model is captured again for that call and cached, with
  a warning that says what it cost;
* each graph serves the model state it was captured in (``state_fingerprint``: module
  attributes, processors, submodules, hooks, the parameters' dtype and device), so a change
  made straight on the model, or ``.to()``/``.half()``, is captured anew on the next call
  (graphs of an earlier dtype or device stay cached for when the model goes back);
* with a ``variant`` (a function of the call's keyword inputs, e.g. of the timestep's value,
  read on the host), its value is part of the key and the builder gets it as a third argument:
  a method whose computation depends on such a value (a timestep switch) gets one graph per
  value, and each call runs only its own;
* a method called through this module (``enable_freeu``, ``set_attn_processor``,
  ``fuse_qkv_projections``, LoRA loading, ...), an attribute set on it and
  ``load_state_dict`` drop the cache.
"""
from __future__ import annotations

import functools
import inspect
import time
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture.guards import input_check_hook
from ..errors import ShapeError
from ..kernels.tomesd import grid_rows, is_grid
from .inputs import STEP_NAMES

_SCALARS = (bool, int, float, str, type(None))
# attribute reads of the model that change nothing (no cache drop when called)
_READERS = ("parameters", "named_parameters", "buffers", "named_buffers", "modules",
            "named_modules", "children", "named_children", "num_parameters", "get_submodule",
            "get_parameter", "get_buffer", "extra_repr", "save_pretrained", "state_dict",
            # diffusers' CacheMixin: pipelines enter a cache context every step and reset it
            # after the last; hooks that enable_cache adds change the state fingerprint
            "cache_context", "_reset_stateful_cache")
_OWN = ("model", "training", "forward")  # attributes that stay on this module


def _skipped(value, default) -> bool:
    """An optional input left out: its default, None or an empty dict."""
    return value is default or value is None or (isinstance(value, dict) and not value)


def _key(value):
    """The part of a call's input that picks a graph: nesting, non-tensor values, and per
    tensor its rank, dtype and device (sizes are the graph's own guards' business)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dim(), value.dtype, value.device.type)
    if isinstance(value, dict):
        return ("dict", tuple((k, _key(v)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    return value if isinstance(value, _SCALARS) else ("object", type(value).__name__)


# the call key holds the mode; torch.compile(model) marks the model it wraps, changing nothing
_NOT_STATE = ("training", "_is_torch_compile")


def state_fingerprint(model: nn.Module) -> int:
    """A hash of what a captured graph bakes in besides the weights' values: per module its
    scalar attributes, the identity of every other attribute (processors, submodules,
    parameters), small dicts of scalars (LoRA scales), and the parameters' dtype and device."""
    out = []
    for mod in model.modules():
        for name, v in mod.__dict__.items():
            t = type(v)
            if name in _NOT_STATE:
                continue
            if t in _SCALARS:
                out.append((name, v))
            elif isinstance(v, dict):
                out.append(tuple(map(id, v.values())) if name.startswith("_") else
                           tuple((k, x) for k, x in v.items() if type(x) in _SCALARS))
            else:
                out.append(id(v))
    first = next(model.parameters(), None)
    if first is not None:
        out.append((first.dtype, first.device))
    return hash(tuple(out))


class _Entry:
    """One captured graph: the call key and model state it serves, and whether it takes any
    size (export's guards check sizes) or only the sizes it was captured at (``sizes``)."""

    __slots__ = ("key", "state", "module", "sizes", "widths")

    def __init__(self, key, state, module, sizes):
        self.key, self.state, self.module, self.sizes = key, state, module, sizes
        self.widths = _grid_widths(module)

    def takes(self, inputs: dict) -> bool:
        """Whether image position ids (Flux's ``img_ids``) are the grid the graph reads, checked
        on the host: a compiled graph's own check could not be caught (a device assert)."""
        ids = inputs.get("img_ids")
        return not self.widths or not isinstance(ids, torch.Tensor) or \
            all(is_grid(ids, w) for w in self.widths)


class DiffusionModule(nn.Module):
    """What ``optimize(method="tomesd")`` returns for a diffusers model (see the module
    docstring). ``.model`` is the real model; ``.graph`` the rewritten module for the inputs
    ``optimize`` was given; ``.graphs`` every cached one; ``.tome`` the plan of the graph the
    last call ran (its level table is at that graph's capture size; the ratio per level holds
    at every size)."""

    def __init__(self, model: nn.Module, build: Callable, inputs: dict, first: nn.Module,
                 variant: Callable[[dict], Any] | None = None):
        super().__init__()
        self.model = model  # .to(), .train(), parameters() reach the real model
        self.training = model.training  # the graphs are stored in the model's mode
        own = {"_build": build, "_signature": inspect.signature(model.forward),
               "_example": inputs, "_entries": [], "_last": None, "_variant": variant}
        self.__dict__.update(own)
        self._store(self._call_key(inputs), state_fingerprint(model), first, inputs)

    # -- what the pipeline reads --------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def graph(self) -> nn.Module:
        """The rewritten module for the inputs ``optimize`` was given (captured again after a
        state change)."""
        key, state = self._call_key(self._example), state_fingerprint(self.model)
        entry = next((e for e in self._entries if (e.key, e.state) == (key, state)), None)
        return (entry or self._capture(key, state, self._example, quiet=True)).module

    @property
    def graphs(self) -> list[nn.Module]:
        return [e.module for e in self._entries]

    @property
    def tome(self):
        last = self._last or (self._entries[0] if self._entries else None)
        return last.module.tome if last is not None else self.graph.tome

    @property
    def tome_counts(self) -> dict:
        """The rewrite counts of the graph the last call ran (as ``.tome``)."""
        last = self._last or (self._entries[0] if self._entries else None)
        return last.module.tome_counts if last is not None else self.graph.tome_counts

    @property
    def tome_inputs(self) -> tuple:
        return (), dict(self._example)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "model" not in self.__dict__.get("_modules", {}):
                raise
        value = getattr(self._modules["model"], name)
        if callable(value) and not isinstance(value, nn.Module) and name not in _READERS \
                and getattr(value, "__self__", None) is not None:
            return self._dropping(value)
        return value

    def __setattr__(self, name: str, value) -> None:
        model = self.__dict__.get("_modules", {}).get("model")
        if model is None or name in _OWN or name.startswith("_") or name in type(self).__dict__:
            super().__setattr__(name, value)
            return
        setattr(model, name, value)  # a state change of the model: the graphs are stale
        self.drop_graphs()

    def _dropping(self, method):
        @functools.wraps(method)
        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            finally:
                self.drop_graphs()
        return call

    def drop_graphs(self) -> None:
        """Forget every captured graph (the model changed); the next call captures again."""
        self._entries.clear()
        self.__dict__["_last"] = None

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.cuda()`` move the model; graphs captured at another dtype
        or device stay cached for when it comes back (model offloading moves it every call)."""
        self.model._apply(fn, recurse)
        return self

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        try:
            return self.model.load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self.drop_graphs()

    # -- calls ----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        inputs, return_dict = bind_call(self._signature, args, kwargs,
                                        f"{type(self.model).__name__}.forward", self._example)
        out = self._run(self._call_key(inputs), inputs)
        if return_dict is False and hasattr(out, "to_tuple"):
            return out.to_tuple()
        return out

    def _call_key(self, inputs: dict):
        key = tuple((n, _key(v)) for n, v in inputs.items()), self.model.training
        return key if self._variant is None else (*key, self._variant(inputs))

    def _run(self, key, inputs: dict):
        sizes, state = _sizes(inputs), state_fingerprint(self.model)
        for entry in self._entries:
            if (entry.key, entry.state) != (key, state) or entry.sizes not in (None, sizes) \
                    or not entry.takes(inputs):
                continue
            try:
                out = entry.module(**inputs)
            except ShapeError:  # its guards refuse these sizes (checked before any compute)
                continue
            self.__dict__["_last"] = entry
            return out
        entry = self._capture(key, state, inputs)
        return entry.module(**inputs)

    def _capture(self, key, state: int, inputs: dict, quiet: bool = False) -> _Entry:
        start = time.perf_counter()
        extra = () if self._variant is None else (key[2],)
        module = self._build(self.model, inputs, *extra)
        entry = self._store(key, state, module, inputs)
        if not quiet:
            shapes = ", ".join(f"{n} {tuple(v.shape)}" for n, v in inputs.items()
                               if isinstance(v, torch.Tensor))
            warnings.warn(f"tome_fx captured {type(self.model).__name__} again for a new call "
                          f"({shapes}) in {time.perf_counter() - start:.1f} s; calls like it "
                          "reuse it", UserWarning, stacklevel=4)
        self.__dict__["_last"] = entry
        return entry

    def _store(self, key, state: int, module: nn.Module, inputs: dict) -> _Entry:
        module.train(self.training)
        entry = _Entry(key, state, module, None if _guards_sizes(module) else _sizes(inputs))
        self._entries.append(entry)
        return entry

    def train(self, mode: bool = True):
        super().train(mode)
        for entry in self._entries:
            entry.module.train(mode)
        return self


def bind_call(signature: inspect.Signature, args: tuple, kwargs: dict, what: str,
              like: dict | None = None) -> tuple[dict, Any]:
    """(keyword inputs, ``return_dict``) of a call as the model's ``signature`` reads it:
    optional inputs left out (default, None or an empty dict), a scalar timestep made one per
    sample (``batched_step``); a call the signature cannot take is a one-line TypeError
    starting with ``what``."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{what}: {exc}") from None
    return_dict = bound.arguments.pop("return_dict", True)
    inputs = {n: v for n, v in bound.arguments.items()
              if not _skipped(v, signature.parameters[n].default)}
    batched_step(inputs, like)
    return inputs, return_dict


def batched_step(inputs: dict, like: dict | None = None) -> None:
    """A scalar timestep (a number, a 0-d tensor or one value for the batch, as pipelines pass
    it) becomes one per sample, as the model itself broadcasts it. An integer timestep (DDIM's)
    becomes floating where ``like``'s is (the model embeds it as a float either way, and one
    graph then serves both kinds of scheduler)."""
    image = next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() >= 3),
                 None)
    for name in STEP_NAMES:
        if name not in inputs or image is None:
            continue
        t = torch.as_tensor(inputs[name], device=image.device)
        if t.numel() == 1 and (t.dim() == 0 or t.shape[0] != image.shape[0]):
            t = t.reshape(()).expand(image.shape[0])
        example = (like or {}).get(name)
        if isinstance(example, torch.Tensor) and example.is_floating_point() \
                and not t.is_floating_point():
            t = t.to(example.dtype)
        inputs[name] = t


def _grid_widths(module: nn.Module) -> set:
    """The grid widths a graph reads its image position ids at (``kernels.tomesd.grid_rows``)."""
    graph = getattr(getattr(module, "_orig_mod", module), "graph", None)
    if not isinstance(graph, fx.Graph):
        return set()
    return {n.args[1] for n in graph.nodes if n.op == "call_function" and n.target is grid_rows}


def _sizes(inputs: dict) -> tuple:
    return tuple((n, tuple(v.shape[1:])) for n, v in inputs.items() if isinstance(v, torch.Tensor))


def _guards_sizes(module: nn.Module) -> bool:
    """Whether the graph checks its input sizes itself (an export capture's input check), so
    one graph can serve several sizes; an fx graph serves the sizes it was captured at."""
    gm = getattr(module, "_orig_mod", module)  # compiled: the graph inside
    return isinstance(gm, fx.GraphModule) and input_check_hook(gm) is not None


def call_inputs(model: nn.Module, example_inputs: Any) -> dict:
    """``example_inputs`` (a dict, a tuple of positional inputs or one tensor) as keyword inputs
    of ``model.forward``, optional ones left out, ``return_dict`` dropped and a scalar timestep
    made one per sample."""
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    return bind_call(inspect.signature(model.forward), args, kwargs,
                     f"example_inputs do not fit {type(model).__name__}.forward")[0]
