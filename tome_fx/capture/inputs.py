"""Example inputs: the forms ``example_inputs`` takes, and defaults from a model's config."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import CaptureError, one_line
from .export import exported_inputs, is_exported_program


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tensor, a tuple of inputs or a dict, not {type(example_inputs).__name__}"
    )


def default_inputs(model: nn.Module, batch: int = 2) -> tuple:
    """Example inputs from the model's declared input size (timm cfg or a config's image_size);
    an ExportedProgram's own example inputs."""
    if is_exported_program(model):
        args, kwargs = exported_inputs(model)
        if args and kwargs:
            raise ValueError("the ExportedProgram takes positional and keyword inputs; pass "
                             "example_inputs=")
        return kwargs or args
    size = declared_size(model)
    if size is None:
        raise ValueError(
            f"{type(model).__name__} declares no input size; pass example_inputs=(tensor, ...)"
        )
    return (torch.randn(batch, *size),)


def declared_size(model: nn.Module) -> tuple | None:
    """The input size (without the batch) a model declares: timm ``pretrained_cfg`` (at the
    patch embedding's image size), a config's ``image_size`` and ``num_channels``, video frames,
    audio spectrogram length and bins; None if it declares none."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size is None:
        config = getattr(model, "config", None)
        image = getattr(config, "image_size", None)
        channels = getattr(config, "num_channels", 3)
        if isinstance(image, int):
            size = (channels, image, image)
        elif isinstance(image, (tuple, list)) and len(image) == 2:
            size = (channels, *image)
        frames = getattr(config, "num_frames", None)  # video: [B, T, C, H, W]
        if size is not None and isinstance(frames, int):
            size = (frames, *size)
        bins, length = getattr(config, "num_mel_bins", None), getattr(config, "max_length", None)
        if size is None and isinstance(bins, int) and isinstance(length, int):
            size = (length, bins)  # audio spectrogram: [B, time, mel bins]
    if size is None:
        return None
    img = getattr(model, "patch_embed", None)
    img_size = getattr(img, "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and len(size) == 3:
        size = (size[0], *img_size)
    return tuple(size)


def _described(args: tuple, kwargs: dict) -> str:
    def one(x):
        if isinstance(x, torch.Tensor):
            return f"[{', '.join(map(str, x.shape))}] {str(x.dtype).replace('torch.', '')}"
        return type(x).__name__
    return ", ".join([one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()])


def _hint(model: nn.Module, args: tuple, kwargs: dict) -> str:
    """What differs from what the model declares: its input size, its parameters' dtype."""
    hints = []
    x = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
    size = declared_size(model)
    if x is not None and size is not None and tuple(x.shape[1:]) != size:
        hints.append("the input has no batch dimension (add one: x[None])" if tuple(x.shape) == size
                     else f"{type(model).__name__} takes [batch, {', '.join(map(str, size))}]")
    params = {p.dtype for p in model.parameters() if p.is_floating_point()}
    floats = {t.dtype for t in (*args, *kwargs.values())
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if len(params) == 1 and floats and floats != params:
        want = next(iter(params))
        hints.append(f"the inputs are {', '.join(sorted(map(str, floats)))} and the model's "
                     f"parameters {want} (convert one to the other's dtype)")
    return "".join(f"; {h}" for h in hints)


def run_example(model: nn.Module, args: tuple, kwargs: dict):
    """``model``'s output on the example inputs, without gradients; a ``CaptureError`` naming why
    it fails: the model's own error, the inputs, and what differs from what the model declares
    (input size, parameters' dtype)."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as exc:  # the model's own error, whatever it is: one line with its cause
        raise CaptureError(f"{type(model).__name__} fails on the example inputs "
                           f"({_described(args, kwargs)}): {type(exc).__name__}: "
                           f"{one_line(exc).rstrip('.')}{_hint(model, args, kwargs)}") from exc
