"""Default example inputs of a diffusers model, from its config and its forward signature.

A model is a diffusers model when a class named ``ModelMixin`` is in its MRO (as the authors'
``tomesd`` tells them apart). diffusers is imported only for a model that takes its RoPE table as
an input (Lumina-Next, HunyuanDiT), to make it with diffusers' own function.

The latent's layout follows the config: ``num_frames`` (SVD) is ``[B, F, C, H, W]``,
``sample_frames`` (CogVideoX) the same at the compressed frame count, ``motion_max_seq_length``
(AnimateDiff's ``UNetMotionModel``) and a 3-D ``patch_size`` (Wan) ``[B, C, F, H, W]``, ``img_ids``
in the signature (Flux) packed 2x2 patches ``[B, H/2 * W/2, C]``, else ``[B, C, H, W]``.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn


BATCH = 2  # a prompt and its unconditional twin (classifier-free guidance)
TEXT_TOKENS = 77  # CLIP's prompt length
SIDE = 64  # latent side when the config has no sample size (512 px at 8x)
FRAMES = 16  # latent frames when the config has no frame count (AnimateDiff's clips)
VIDEO_FRAMES = 4  # latent frames of a video transformer without a configured count
STEP_NAMES = ("timestep", "timesteps")
TEXT_DIMS = ("cross_attention_dim", "joint_attention_dim", "caption_channels", "text_embed_dim",
             "text_dim", "cap_feat_dim")


def is_diffusers(model) -> bool:
    return any(c.__name__ == "ModelMixin" for c in type(model).__mro__)


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def latent_shape(cfg, names) -> tuple:
    """The latent's shape without the batch, in the model's own layout (see the module doc)."""
    side = _first(cfg.get("sample_size")) or SIDE
    channels = cfg.get("in_channels") or 4
    if cfg.get("num_frames"):  # SVD
        return cfg["num_frames"], channels, side, side
    if cfg.get("sample_frames"):  # CogVideoX: frames compressed by the VAE
        frames = (cfg["sample_frames"] - 1) // (cfg.get("temporal_compression_ratio") or 1) + 1
        return frames, channels, cfg.get("sample_height") or side, cfg.get("sample_width") or side
    if cfg.get("motion_max_seq_length"):  # AnimateDiff
        return channels, min(FRAMES, cfg["motion_max_seq_length"]), side, side
    if isinstance(cfg.get("patch_size"), (tuple, list)) and len(cfg["patch_size"]) == 3:  # Wan
        return channels, VIDEO_FRAMES, side, side
    if "img_ids" in names:  # Flux: 2x2 latent patches packed into tokens by the pipeline
        return (side // 2) * (side // 2), channels
    return channels, side, side


def default_inputs(model: nn.Module, batch: int = BATCH, size: tuple | None = None,
                   generator: torch.Generator | None = None) -> dict:
    """Example inputs of a diffusers UNet or diffusion transformer: ``batch`` latents (default
    two: a prompt and its unconditional twin) of ``size`` (the latent's shape without the batch,
    in the model's layout; default from the config), a timestep, and what the config and the
    forward signature say it conditions on, random from ``generator``."""
    cfg = model.config
    params = inspect.signature(model.forward).parameters
    names = set(params)
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.is_floating_point() else None

    def randn(*shape):  # drawn on the CPU (repeatable), then where the model is
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    def ones(*shape):
        return torch.ones(*shape, dtype=torch.long, device=device)

    shape = tuple(size) if size is not None else latent_shape(cfg, names)
    step = 0.5 if "img_ids" in names else 500.0  # Flux takes t / 1000
    out: dict[str, Any] = {"sample" if "sample" in names else "hidden_states": randn(batch, *shape),
                           "timestep": torch.full((batch,), step, device=device)}
    text = next((_first(cfg.get(k)) for k in TEXT_DIMS if cfg.get(k)), None)
    tokens = (1 if cfg.get("num_frames") else  # SVD: one CLIP image embedding
              cfg.get("text_len") or cfg.get("max_text_seq_length") or TEXT_TOKENS)
    if text and "encoder_hidden_states" in names:  # AnimateDiff's pipeline repeats it per frame
        per = shape[1] if cfg.get("motion_max_seq_length") else 1
        out["encoder_hidden_states"] = randn(batch * per, tokens, text)
    for mask in ("encoder_mask", "encoder_attention_mask"):  # Lumina: required masks
        if mask in required:
            out[mask] = ones(batch, tokens)
    if cfg.get("addition_embed_type") == "text_time":  # SDXL
        time_dim = cfg.get("addition_time_embed_dim")
        pooled = cfg.get("projection_class_embeddings_input_dim") - 6 * time_dim
        out["added_cond_kwargs"] = {"text_embeds": randn(batch, pooled),
                                    "time_ids": randn(batch, 6)}
    if "added_time_ids" in names:  # SVD: fps, motion bucket, noise strength (3 in SVD)
        width = cfg["projection_class_embeddings_input_dim"] // cfg["addition_time_embed_dim"]
        out["added_time_ids"] = randn(batch, width)
    if cfg.get("pooled_projection_dim") and "pooled_projections" in names:  # SD3, Flux
        out["pooled_projections"] = randn(batch, cfg.get("pooled_projection_dim"))
    if cfg.get("num_embeds_ada_norm") and "class_labels" in names:  # DiT
        out["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device)
    if "controlnet_cond" in names:  # the conditioning image, at the pixels' size
        scale = 2 ** (len(cfg.get("conditioning_embedding_out_channels") or (0,) * 4) - 1)
        out["controlnet_cond"] = randn(batch, cfg.get("conditioning_channels") or 3,
                                       shape[-2] * scale, shape[-1] * scale)
    if "img_ids" in names:
        out.update(_flux(cfg, shape, batch, tokens, randn, device))
    if "text_embedding_mask_t5" in names:
        out.update(_hunyuan(cfg, shape, batch, randn, ones, device))
    if "image_rotary_emb" in required:  # Lumina-Next
        from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
        p = cfg.get("patch_size") or 1
        head = cfg["hidden_size"] // cfg["num_attention_heads"]
        out["image_rotary_emb"] = get_2d_rotary_pos_embed_lumina(
            head, shape[-2] // p, shape[-1] // p).to(device)
        # the pipeline's default (proportional attention); its forward cannot take None
        out["cross_attention_kwargs"] = {"base_sequence_length": (shape[-1] * 8 // 16) ** 2}
    return out


def _flux(cfg, shape, batch, tokens, randn, device) -> dict:
    """Flux: row and column of every packed token, text ids, guidance if embedded."""
    side = int(round(shape[0] ** 0.5))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(shape[0] // side), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    out = {"img_ids": ids.to(device), "txt_ids": torch.zeros(tokens, 3, device=device)}
    if cfg.get("guidance_embeds"):
        out["guidance"] = torch.full((batch,), 3.5, device=device)
    return out


def _hunyuan(cfg, shape, batch, randn, ones, device) -> dict:
    """HunyuanDiT: CLIP and T5 text with masks, image size and style, its 2-D RoPE table."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    p = cfg.get("patch_size") or 1
    grid = (shape[-2] // p, shape[-1] // p)
    t5 = cfg.get("text_len_t5") or TEXT_TOKENS
    pixels = [shape[-2] * 8, shape[-1] * 8]
    return {"text_embedding_mask": ones(batch, cfg.get("text_len") or TEXT_TOKENS),
            "encoder_hidden_states_t5": randn(batch, t5, cfg["cross_attention_dim_t5"]),
            "text_embedding_mask_t5": ones(batch, t5),
            "image_meta_size": torch.tensor([pixels * 2 + [0, 0]] * batch, dtype=torch.float32,
                                            device=device),
            "style": torch.zeros(batch, dtype=torch.long, device=device),
            "image_rotary_emb": get_2d_rotary_pos_embed(cfg["attention_head_dim"], ((0, 0), grid),
                                                        grid, device=device)}
