"""Default example inputs of a diffusers model, from its config.

diffusers is never imported: a model is a diffusers model when a class named ``ModelMixin`` is
in its MRO (as the authors' ``tomesd`` tells them apart).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn


BATCH = 2  # a prompt and its unconditional twin (classifier-free guidance)
TEXT_TOKENS = 77  # CLIP's prompt length
STEP_NAMES = ("timestep", "timesteps")


def is_diffusers(model) -> bool:
    return any(c.__name__ == "ModelMixin" for c in type(model).__mro__)


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def default_inputs(model: nn.Module, batch: int = BATCH, size: tuple | None = None,
                   generator: torch.Generator | None = None) -> dict:
    """Example inputs of a diffusers UNet or diffusion transformer: ``batch`` latents (default
    two: a prompt and its unconditional twin) of ``size`` (C, H, W; default the configured
    sample size), a timestep, and what the config says it conditions on, random from
    ``generator``."""
    cfg = model.config
    side = _first(cfg.get("sample_size")) or 64
    size = tuple(size) if size is not None else (cfg.get("in_channels", 4), side, side)
    names = inspect.signature(model.forward).parameters
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.is_floating_point() else None

    def randn(*shape):  # drawn on the CPU (repeatable), then where the model is
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    out: dict[str, Any] = {"sample" if "sample" in names else "hidden_states": randn(batch, *size),
                           "timestep": torch.full((batch,), 500.0, device=device)}
    text = cfg.get("cross_attention_dim") or cfg.get("joint_attention_dim")
    text = _first(text) or cfg.get("caption_channels")
    if text and "encoder_hidden_states" in names:
        out["encoder_hidden_states"] = randn(batch, TEXT_TOKENS, text)
    if cfg.get("addition_embed_type") == "text_time":  # SDXL
        time_dim = cfg.get("addition_time_embed_dim")
        pooled = cfg.get("projection_class_embeddings_input_dim") - 6 * time_dim
        out["added_cond_kwargs"] = {"text_embeds": randn(batch, pooled),
                                    "time_ids": randn(batch, 6)}
    if cfg.get("pooled_projection_dim") and "pooled_projections" in names:  # SD3
        out["pooled_projections"] = randn(batch, cfg.get("pooled_projection_dim"))
    if cfg.get("num_embeds_ada_norm") and "class_labels" in names:  # DiT
        out["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device)
    return out


