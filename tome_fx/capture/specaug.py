"""SpecAugment of HuggingFace speech models in a graph, its masks drawn afresh on every call.

wav2vec2, HuBERT, WavLM, data2vec-audio, SEW, UniSpeech, SpeechT5... mask their features in
``_mask_hidden_states`` with spans drawn by numpy (``_compute_mask_indices``); a graph would
record one draw as a constant. On capture's copy that method is replaced by the same
computation whose draw is one call of ``spec_augment_mask``: a Python function fx keeps as one
node, around an op opaque to torch.export (``tome_fx::spec_augment_mask``) that calls the
model's own ``_compute_mask_indices``, so the distribution and numpy's generator are HF's. The
masks are applied in plain torch (``torch.where`` with ``masked_spec_embed``, features zeroed),
so ``masked_spec_embed`` is trained with no custom gradient. The ``training`` flag is switched by
``.train()``/``.eval()`` like dropout (``capture.train``, which also detaches the embedding
under ``.eval()``): under ``.eval()`` nothing is drawn nor masked, and an export of the module
in eval mode holds no call of the op.
"""
import importlib
import sys
import types
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn


def _no_mask(hidden: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.zeros(hidden.shape[0], hidden.shape[dim], dtype=torch.bool,
                       device=hidden.device)


@torch.library.custom_op("tome_fx::spec_augment_mask", mutates_args=())
def _draw(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], dim: int, prob: float,
          length: int, min_masks: int, training: bool, module: str) -> torch.Tensor:
    """The boolean mask ``[batch, hidden.shape[dim]]`` that ``module._compute_mask_indices``
    draws (``attention_mask``: the real length of each sample)."""
    if not training or prob <= 0:
        return _no_mask(hidden, dim)
    compute = importlib.import_module(module)._compute_mask_indices
    mask = compute((hidden.shape[0], hidden.shape[dim]), mask_prob=prob, mask_length=length,
                   attention_mask=attention_mask, min_masks=min_masks)
    return torch.as_tensor(mask, dtype=torch.bool).to(hidden.device)


@_draw.register_fake
def _(hidden, attention_mask, dim, prob, length, min_masks, training, module):
    return hidden.new_empty(hidden.shape[0], hidden.shape[dim], dtype=torch.bool)


@fx.wrap
def spec_augment_mask(hidden, attention_mask, dim: int, prob: float, length: int,
                      min_masks: int, training: bool, module: str):
    """``tome_fx::spec_augment_mask``, called only when it draws: traced in eval mode (the
    module's export), this is an all-False mask of plain ATen ops."""
    if not training or prob <= 0:
        return _no_mask(hidden, dim)
    return torch.ops.tome_fx.spec_augment_mask(hidden, attention_mask, dim, prob, length,
                                               min_masks, training, module)


EMBED = "masked_spec_embed"  # what a drawn time mask puts in the masked positions
DRAWS = (torch.ops.tome_fx.spec_augment_mask, torch.ops.tome_fx.spec_augment_mask.default)
# a torch.export graph calls the op; the graph calls it through the wrapper
CALLED_THROUGH = {torch.ops.tome_fx.spec_augment_mask.default: spec_augment_mask}


def _mask_hidden_states(self, hidden_states, mask_time_indices=None, attention_mask=None):
    """HuggingFace's ``_mask_hidden_states`` (same arguments and result) with its draws through
    ``spec_augment_mask`` and its in-place writes as ``torch.where``/``masked_fill``."""
    config = self.config
    if not getattr(config, "apply_spec_augment", True):
        return hidden_states
    home = type(self)._mask_hidden_states.__module__  # where HF's _compute_mask_indices is
    embed = self.masked_spec_embed.to(hidden_states.dtype)
    if mask_time_indices is not None:
        hidden_states = torch.where(mask_time_indices[..., None], embed, hidden_states)
    elif config.mask_time_prob > 0 and self.training:
        time = spec_augment_mask(hidden_states, attention_mask, 1, config.mask_time_prob,
                                 config.mask_time_length, config.mask_time_min_masks, True, home)
        hidden_states = torch.where(time[..., None], embed, hidden_states)
    if config.mask_feature_prob > 0 and self.training:
        feature = spec_augment_mask(hidden_states, None, 2, config.mask_feature_prob,
                                    config.mask_feature_length, config.mask_feature_min_masks,
                                    True, home)
        hidden_states = hidden_states.masked_fill(feature[:, None], 0)
    return hidden_states


def _has_spec_augment(module: nn.Module) -> bool:
    """HuggingFace's own SpecAugment: the method, its embedding, its config and the module
    that defines the method has ``_compute_mask_indices``."""
    method = getattr(type(module), "_mask_hidden_states", None)
    home = sys.modules.get(getattr(method, "__module__", None) or "")
    config = getattr(module, "config", None)
    return (home is not None and home.__name__.startswith("transformers.")
            and callable(getattr(home, "_compute_mask_indices", None))
            and isinstance(getattr(module, "masked_spec_embed", None), nn.Parameter)
            and hasattr(config, "apply_spec_augment") and hasattr(config, "mask_time_prob"))


def swap_spec_augment(model: nn.Module) -> int:
    """Give every HuggingFace SpecAugment in ``model`` (a copy the caller owns) the graph-safe
    ``_mask_hidden_states``; returns how many."""
    found = [m for m in model.modules() if _has_spec_augment(m)]
    for m in found:
        m._mask_hidden_states = types.MethodType(_mask_hidden_states, m)
    return len(found)
