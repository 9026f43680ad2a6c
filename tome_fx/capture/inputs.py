"""Example inputs: the forms ``example_inputs`` takes, and defaults from a model's config."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

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
        raise ValueError(
            f"{type(model).__name__} declares no input size; pass example_inputs=(tensor, ...)"
        )
    img = getattr(model, "patch_embed", None)
    img_size = getattr(img, "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and len(size) == 3:
        size = (size[0], *img_size)
    return (torch.randn(batch, *size),)
