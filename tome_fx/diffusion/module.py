"""A rewritten diffusers model that drops into a pipeline
(``pipe.unet = tome_fx.optimize(pipe.unet, method="tomesd", ratio=0.5)``)."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from ..errors import ShapeError
from .inputs import STEP_NAMES

class DiffusionModule(nn.Module):
    """A rewritten diffusers model that a pipeline can call as it calls the original: the
    original's signature (``return_dict``, optional arguments left at their defaults),
    ``config``, ``dtype``, ``device``, and its other attributes read from a skeleton of the
    original on the meta device (no memory). ``.graph`` is the rewritten module."""

    def __init__(self, graph: nn.Module, model: nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.graph = graph
        names = list(inspect.signature(model.forward).parameters)
        object.__setattr__(self, "_signature", inspect.signature(model.forward))
        object.__setattr__(self, "_positional", tuple(names[:len(args)]))
        object.__setattr__(self, "_keywords", tuple(kwargs))
        object.__setattr__(self, "_skeleton", _skeleton(model))
        step = dict(zip(names, args)) | kwargs
        object.__setattr__(self, "_step", next(((n, v) for n, v in step.items()
                                                if n in STEP_NAMES and _is_batched(v)), None))
        object.__setattr__(self, "config", model.config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.graph.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.graph.parameters()).device

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            skeleton = self.__dict__.get("_skeleton")
            if skeleton is None or name.startswith("_"):
                raise
            return getattr(skeleton, name)

    def forward(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        taken = set(self._positional) | set(self._keywords)
        for name, value in bound.arguments.items():
            default = self._signature.parameters[name].default
            if name not in taken and name != "return_dict" and value is not default \
                    and value is not None and value != {}:
                raise ShapeError(f"{name}= was not in the example inputs the model was optimized "
                                 f"with; pass it in example_inputs to tome_fx.optimize")
        self._batched_step(bound.arguments)
        missing = [n for n in self._positional + self._keywords if n not in bound.arguments]
        if missing:
            raise ShapeError(f"missing input {missing[0]!r}: the model was optimized with it")
        out = self.graph(*(bound.arguments[n] for n in self._positional),
                         **{n: bound.arguments[n] for n in self._keywords})
        if bound.arguments.get("return_dict", True) is False and hasattr(out, "to_tuple"):
            return out.to_tuple()
        return out


    def _batched_step(self, arguments: dict) -> None:
        """A scalar timestep (as SD pipelines pass it) becomes one per sample, in the example's
        dtype, as the model itself broadcasts it."""
        if self._step is None or self._step[0] not in arguments:
            return
        name, example = self._step
        image = next(v for v in arguments.values() if isinstance(v, torch.Tensor) and v.dim() >= 3)
        t = torch.as_tensor(arguments[name], device=image.device)
        if t.dim() == 0:
            arguments[name] = t.to(example.dtype).expand(image.shape[0])


def _is_batched(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 1


def _skeleton(model: nn.Module) -> nn.Module | None:
    """The model's structure without weights (meta device), for attribute reads."""
    try:
        with torch.device("meta"):
            return type(model).from_config(model.config)
    except Exception:  # attribute reads then fail as on any module
        return None
