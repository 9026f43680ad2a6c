"""Model zoo: timm vision transformers and plain-PyTorch transformers that tome_fx rewrites.

Parametrized like timm's tests/test_models.py: one id per model. Every model is built from its
config with random weights (``pretrained=False``; nothing is downloaded). The default cases are
shrunk (fewer blocks, smaller images) so the zoo stays fast on a 2-core CPU, keeping each
architecture feature (class/distillation/register tokens, LayerScale, pre-norm, q/k-norm,
average pooling, fc_norm); the full-size ViTs at 224 and 384 are marked slow. The expected block
count and protected tokens come from each model's config (``len(model.blocks)``,
``model.num_prefix_tokens``).

Checks per model (tests/zoo/zoo_checks.py): r=0 unchanged at batch 1 and 3; flops_budget=0.5
reached as measured by FlopCounterMode and equal to the cost model's prediction; merges
happened; finite outputs at batch 1 and 3; backward reaches the same parameters, finite.
"""
from __future__ import annotations

import pytest
import timm
import torch

from zoo_checks import Case, check_budget, check_r0
import zoo_models as zm


def _timm(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, **kw)


def _images(size):
    return lambda b: (torch.randn(b, 3, size, size),)


def _timm_blocks(m):
    return len(m.blocks)


def _timm_prefix(m):
    # class token + distillation token + register tokens, as the model's config sets them
    return m.num_prefix_tokens


def timm_case(id, name, size, slow=False, **kw):
    kw.setdefault("img_size", size)
    return Case(id, _timm(name, **kw), _images(size), _timm_blocks, _timm_prefix, slow)


SMALL = dict(depth=4)  # shrunk default cases: 4 blocks, small images
TIMM = [
    # full-size ViTs (depth and width of the real model)
    timm_case("vit_tiny_patch16_224", "vit_tiny_patch16_224", 224, slow=True),
    timm_case("vit_small_patch16_224", "vit_small_patch16_224", 224, slow=True),
    timm_case("vit_base_patch16_224", "vit_base_patch16_224", 224, slow=True),
    timm_case("vit_tiny_patch16_384", "vit_tiny_patch16_384", 384, slow=True),
    timm_case("vit_small_patch16_384", "vit_small_patch16_384", 384, slow=True),
    timm_case("vit_base_patch16_384", "vit_base_patch16_384", 384, slow=True),
    # shrunk: same widths/heads, 4 blocks
    timm_case("vit_tiny_patch16_224-d4-96px", "vit_tiny_patch16_224", 96, **SMALL),
    timm_case("vit_small_patch16_224-d4-96px", "vit_small_patch16_224", 96, **SMALL),
    timm_case("vit_base_patch16_224-d4-96px", "vit_base_patch16_224", 96, **SMALL),
    timm_case("vit_tiny_patch16_384-d4-128px", "vit_tiny_patch16_384", 128, **SMALL),
    timm_case("deit_tiny_distilled_patch16_224-d4-96px", "deit_tiny_distilled_patch16_224", 96,
              **SMALL),
    timm_case("deit3_small_patch16_224-layerscale-d4-96px", "deit3_small_patch16_224", 96,
              **SMALL),
    timm_case("vit_small_patch14_reg4_dinov2-d4-84px", "vit_small_patch14_reg4_dinov2", 84,
              **SMALL),
    timm_case("vit_tiny_patch16_224-reg_tokens4-d4-96px", "vit_tiny_patch16_224", 96,
              reg_tokens=4, **SMALL),
    timm_case("vit_base_patch16_clip_224-norm_pre-d4-96px", "vit_base_patch16_clip_224", 96,
              **SMALL),
    timm_case("vit_tiny_patch16_224-avgpool-no_cls-d4-96px", "vit_tiny_patch16_224", 96,
              class_token=False, global_pool="avg", **SMALL),
    timm_case("vit_small_patch16_224-mae_style-avg-fc_norm-d4-96px", "vit_small_patch16_224", 96,
              global_pool="avg", fc_norm=True, **SMALL),
    timm_case("vit_small_patch16_224-qk_norm-d4-96px", "vit_small_patch16_224", 96,
              qk_norm=True, **SMALL),
    # full depth of the feature models
    timm_case("deit_tiny_distilled_patch16_224", "deit_tiny_distilled_patch16_224", 224, slow=True),
    timm_case("deit3_small_patch16_224", "deit3_small_patch16_224", 224, slow=True),
    timm_case("vit_small_patch14_reg4_dinov2-224px", "vit_small_patch14_reg4_dinov2", 224,
              slow=True),
    timm_case("vit_base_patch16_clip_224", "vit_base_patch16_clip_224", 224, slow=True),
]


def _tokens(seq):
    return lambda b: (torch.randn(b, seq, 16),)


def _attr_blocks(name):
    return lambda m: len(getattr(m, name)) if name != "encoder" else m.encoder.num_layers


def _prefix(m):
    return m.num_prefix_tokens


TORCH = [
    Case("nn.TransformerEncoder-prenorm", lambda: zm.TorchEncoder(norm_first=True), _tokens(40),
         _attr_blocks("encoder"), _prefix),
    Case("nn.TransformerEncoder-postnorm", lambda: zm.TorchEncoder(norm_first=False), _tokens(40),
         _attr_blocks("encoder"), _prefix),
    Case("nn.TransformerEncoder-postnorm-seq_first",
         lambda: zm.TorchEncoder(norm_first=False, batch_first=False), _tokens(40),
         _attr_blocks("encoder"), _prefix),
    Case("nn.MultiheadAttention-direct", lambda: zm.MHAEncoder(), _tokens(40), _attr_blocks("attn"),
         _prefix),
    Case("explicit-softmax-cls", lambda: zm.explicit_softmax_encoder(depth=4), _tokens(40),
         _attr_blocks("blocks"), _prefix),
    Case("explicit-softmax-meanpool", lambda: zm.explicit_softmax_encoder(depth=4, cls=False,
                                                                          pool="mean"),
         _tokens(40), _attr_blocks("blocks"), _prefix),
]

CASES = [c.param() for c in TIMM + TORCH]


@pytest.mark.parametrize("case", CASES)
def test_r0_unchanged(case):
    check_r0(case)


@pytest.mark.parametrize("case", CASES)
def test_budget_half(case):
    check_budget(case, 0.5)


def test_zoo_covers_features():
    """The shrunk cases keep the features they are named for (read from the built models)."""
    from zoo_checks import built

    by_id = {c.id: c for c in TIMM}
    m = built(by_id["deit_tiny_distilled_patch16_224-d4-96px"])
    assert m.num_prefix_tokens == 2 and len(m.blocks) == 4
    m = built(by_id["deit3_small_patch16_224-layerscale-d4-96px"])
    assert type(m.blocks[0].ls1).__name__ == "LayerScale"
    m = built(by_id["vit_small_patch14_reg4_dinov2-d4-84px"])
    assert m.num_reg_tokens == 4 and m.num_prefix_tokens == 5
    m = built(by_id["vit_tiny_patch16_224-reg_tokens4-d4-96px"])
    assert m.num_reg_tokens == 4 and m.num_prefix_tokens == 5
    m = built(by_id["vit_base_patch16_clip_224-norm_pre-d4-96px"])
    assert isinstance(m.norm_pre, torch.nn.LayerNorm)
    m = built(by_id["vit_tiny_patch16_224-avgpool-no_cls-d4-96px"])
    assert m.num_prefix_tokens == 0 and m.global_pool == "avg"
    m = built(by_id["vit_small_patch16_224-mae_style-avg-fc_norm-d4-96px"])
    assert m.global_pool == "avg" and isinstance(m.fc_norm, torch.nn.LayerNorm)
    m = built(by_id["vit_small_patch16_224-qk_norm-d4-96px"])
    assert isinstance(m.blocks[0].attn.q_norm, torch.nn.LayerNorm)
