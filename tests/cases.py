"""The one model registry of the tests: every zoo model, by id.

Like timm's tests/test_models.py: each ``Case`` builds its model from a config with random
weights (``pretrained=False``; nothing is downloaded) and says what the plan must show, read
from the model (blocks, protected prefix tokens, pooled outputs). ``tests/zoo/test_zoo.py``
checks every case; other test files pick cases by id. Cases at full size are marked slow.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import pytest
import timm
import torch
import torch.nn as nn

import models


@dataclass(eq=False)  # hashed by identity: built models are cached per case
class Case:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]  # batch size -> example inputs
    blocks: Callable[[nn.Module], int] | None  # expected attention->MLP blocks, from the config
    prefix: Callable[[nn.Module], int] | None  # expected protected tokens, from the config
    pools: Callable[[nn.Module], bool] | None  # the output is a mean over tokens (size-weighted)
    slow: bool = False
    marks: list = field(default_factory=list)
    # "rewritten": every block merges; "partly": some sites refused, the rest merge; "refused":
    # nothing merges. ``reason``: what every refusal says (a substring), beside the case.
    outcome: str = "rewritten"
    reason: tuple = ()  # every skip reason contains one of these
    budget: float = 0.5  # the flops_budget the zoo checks (reachable for this model)

    def param(self):
        marks = list(self.marks) + ([pytest.mark.slow] if self.slow else [])
        return pytest.param(self, id=self.id, marks=marks)


@functools.lru_cache(maxsize=None)
def built(case: Case) -> nn.Module:
    """The case's model (seed 0, eval mode), built once per test session; never mutated."""
    torch.manual_seed(0)
    return case.build().eval()


def inputs(case: Case, batch: int) -> tuple:
    torch.manual_seed(batch)
    return case.inputs(batch)


def timm_model(name: str, **kw) -> nn.Module:
    """A timm model with random weights (seed 0, eval mode)."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval()


def _images(size):
    return lambda b: (torch.randn(b, 3, size, size),)


def _tokens(seq, width=16):
    return lambda b: (torch.randn(b, seq, width),)


def timm_case(id, name, size, slow=False, **kw) -> Case:
    kw.setdefault("img_size", size)
    return Case(id, lambda: timm.create_model(name, pretrained=False, **kw), _images(size),
                lambda m: len(m.blocks), lambda m: m.num_prefix_tokens,
                lambda m: m.global_pool == "avg", slow)


def hand_case(id, build, seq, blocks: str, pools: bool, width=16) -> Case:
    def count(m):
        part = getattr(m, blocks)
        return part.num_layers if isinstance(part, nn.TransformerEncoder) else len(part)

    return Case(id, build, _tokens(seq, width), count, lambda m: m.num_prefix_tokens,
                lambda m: pools)


SMALL = dict(depth=4)  # shrunk cases: 4 blocks, small images
CASES = [
    # full-size ViTs (depth and width of the real model)
    timm_case("vit_tiny_patch16_224", "vit_tiny_patch16_224", 224, slow=True),
    timm_case("vit_small_patch16_224", "vit_small_patch16_224", 224, slow=True),
    timm_case("vit_base_patch16_224", "vit_base_patch16_224", 224, slow=True),
    timm_case("vit_tiny_patch16_384", "vit_tiny_patch16_384", 384, slow=True),
    timm_case("vit_small_patch16_384", "vit_small_patch16_384", 384, slow=True),
    timm_case("vit_base_patch16_384", "vit_base_patch16_384", 384, slow=True),
    timm_case("deit_tiny_patch16_224", "deit_tiny_patch16_224", 224, slow=True),
    timm_case("vit_tiny_patch16_224-avgpool-no_cls", "vit_tiny_patch16_224", 224, slow=True,
              class_token=False, global_pool="avg"),
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
    # plain PyTorch
    hand_case("nn.TransformerEncoder-prenorm", lambda: models.TorchEncoder(norm_first=True), 40,
              "encoder", pools=True),
    hand_case("nn.TransformerEncoder-postnorm", lambda: models.TorchEncoder(norm_first=False), 40,
              "encoder", pools=True),
    hand_case("nn.TransformerEncoder-postnorm-seq_first",
              lambda: models.TorchEncoder(norm_first=False, batch_first=False), 40, "encoder",
              pools=True),
    hand_case("nn.TransformerEncoder-postnorm-64d-no_embed",
              lambda: models.TorchEncoder(dim=64, in_dim=None, classes=5), 50, "encoder",
              pools=True, width=64),
    hand_case("nn.MultiheadAttention-direct", lambda: models.MHAEncoder(), 40, "attn", pools=True),
    hand_case("nn.MultiheadAttention-need_weights-prenorm",
              lambda: models.MHAEncoder(depth=4, norm_first=True, need_weights=True), 40, "attn",
              pools=True),
    hand_case("explicit-softmax-cls", lambda: models.explicit_softmax_encoder(depth=4), 40,
              "blocks", pools=False),
    hand_case("explicit-softmax-meanpool",
              lambda: models.explicit_softmax_encoder(depth=4, cls=False, pool="mean"), 40,
              "blocks", pools=True),
    hand_case("explicit-softmax-64d-no_final_norm", lambda: models.TinyTransformer(), 33, "blocks",
              pools=False),
]



def family(id, build, inputs, outcome, reason=(), budget=0.5, prefix=None, slow=False) -> Case:
    """A model family of the wider zoo: its expected outcome, and the reasons beside it."""
    reason = (reason,) if isinstance(reason, str) else tuple(reason)
    return Case(id, build, inputs, None, None if prefix is None else (lambda m: prefix), None,
                slow, outcome=outcome, reason=reason, budget=budget)


def _timm(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, **kw)


def _mvit():
    from timm.models import mvitv2

    cfg = mvitv2.MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=(32, 64, 128, 256),
                                  num_heads=(1, 2, 4, 8))
    return mvitv2.MultiScaleVit(cfg, img_size=(64, 64))


def _volo():
    from timm.models import volo

    return volo.VOLO(layers=(1, 1, 1, 1), embed_dims=(64, 128, 128, 128), num_heads=(2, 4, 4, 4),
                     img_size=64)


def _hf(cls_name, config_name, **kw):
    def build():
        import transformers

        return getattr(transformers, cls_name)(getattr(transformers, config_name)(**kw))

    return build


def _trained(build):
    """``build`` with its relative-position tables drawn at random (as after training)."""
    def trained():
        model = build()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "relative_position_bias_table" in name:
                    p.normal_()
        return model

    return trained


def _text(n):
    return lambda b: (torch.randint(0, 100, (b, n)), torch.ones(b, n, dtype=torch.long))


def _audio(samples):
    return lambda b: (torch.randn(b, samples),)


POSITION = "indexed by token position"
ROTARY = "rotary or position embedding"
TABLE = "does not depend on the input"
CROSS = "queries and keys have different token counts"
HF = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
FAMILIES = [
    # timm: what merges, and why the rest is refused
    family("timm-cait-talking_heads", _timm("cait_xxs24_224", depth=2, img_size=64), _images(64),
           "refused", ("logits pass through permute", CROSS)),  # heads mixed; class attention
    family("timm-xcit-cross_covariance", _timm("xcit_nano_12_p16_224", depth=2, img_size=64),
           _images(64), "refused", ("combined with a tensor", CROSS)),  # temperature; class attn
    family("timm-pit-pooling_stages", _timm("pit_ti_224", img_size=64), _images(64), "refused",
           ("fails with every merge at r=0", "selects tokens by position")),  # pooled stages
    family("timm-convit-gpsa_then_mhsa", _timm("convit_tiny", depth=2, local_up_to_layer=1,
                                                img_size=64), _images(64), "partly",
           ("softmax output goes to", "logits pass through permute"), 0.9),  # gated positional
    family("timm-levit-attention_biases", _timm("levit_128s", img_size=64), _images(64),
           "refused", (POSITION, "logits pass through add")),
    family("timm-crossvit-two_branches", _timm("crossvit_tiny_240", depth=((1, 1, 0),)),
           _images(240), "refused", (CROSS, "fails with every merge at r=0",
                                     "concatenation along the token")),
    # spatial-reduction keys are cross-attention; the last stage (global attention) merges and
    # its tokens are unmerged for the position generator's grid after it (unmerge="auto")
    family("timm-twins_pcpvt-spatial_reduction", _timm("twins_pcpvt_small", depths=(1, 1, 1, 1),
                                                       img_size=64), _images(64), "partly",
           CROSS, budget=0.95),
    family("timm-mvitv2-pooled_attention", _mvit, _images(64), "refused",
           (CROSS, "not the attention's input"), slow=True),
    family("timm-volo-outlook", _volo, _images(64), "refused",
           ("logits pass through permute", "not 3-D", CROSS)),
    family("timm-vit_relpos", _timm("vit_relpos_base_patch16_224", depth=2, img_size=64),
           _images(64), "refused", POSITION),
    family("timm-flexivit", _timm("flexivit_small", depth=4, img_size=64), _images(64),
           "rewritten", prefix=1),
    family("timm-samvit-windows", _timm("samvit_base_patch16", depth=2, img_size=128),
           _images(128), "refused", "windowed attention"),  # one padded window: 8x8 -> 14x14
    family("timm-hiera-mask_unit_windows", _timm("hiera_tiny_224", stages=(1, 1, 1, 1)),
           _images(224), "refused", ("windowed or regrouped", CROSS)),  # mask units; pooled q
    family("timm-eva02-rotary", _timm("eva02_tiny_patch14_224", depth=2, img_size=56),
           _images(56), "partly", ROTARY, 0.95),
    family("timm-vit_rope", _timm("vit_small_patch16_rope_224", depth=2, img_size=64),
           _images(64), "partly", ROTARY, 0.95),
    family("timm-siglip-attention_pool", _timm("vit_base_patch16_siglip_224", depth=4,
                                               img_size=64), _images(64), "rewritten", prefix=0),
    # HuggingFace transformers (torch.export path)
    family("hf-data2vec_vision-zero_tables", _hf("Data2VecVisionModel", "Data2VecVisionConfig",
                                                 **HF, image_size=64, patch_size=8,
                                                 use_relative_position_bias=True),
           _images(64), "refused", POSITION),
    family("hf-data2vec_vision-trained_tables", _trained(_hf(
        "Data2VecVisionModel", "Data2VecVisionConfig", **HF, image_size=64, patch_size=8,
        use_relative_position_bias=True)), _images(64), "refused", POSITION),
    family("hf-distilbert", _hf("DistilBertModel", "DistilBertConfig", dim=64, n_layers=4,
                                n_heads=4, hidden_dim=128, vocab_size=100), _text(24),
           "rewritten", prefix=0),
    family("hf-roberta-pooler", _hf("RobertaModel", "RobertaConfig", **HF, vocab_size=100,
                                    pad_token_id=1), _text(24), "rewritten", prefix=1, budget=0.8),
    family("hf-wav2vec2", _hf("Wav2Vec2Model", "Wav2Vec2Config", **HF, conv_dim=(32, 32),
                              conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
                              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
           _audio(4000), "rewritten", prefix=0, budget=0.8),
    family("hf-segformer-spatial_reduction", _hf(
        "SegformerModel", "SegformerConfig", num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
        hidden_sizes=[32, 64], num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2],
        mlp_ratios=[2, 2]), _images(64), "refused", (CROSS, "folds or splits")),
    family("hf-swin-windows", _hf("SwinModel", "SwinConfig", image_size=64, patch_size=4,
                                  embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4),
           _images(64), "refused", POSITION),
    family("hf-yolos-mid_position_embeddings", _hf("YolosModel", "YolosConfig", **HF,
                                                   image_size=[64, 64], patch_size=8,
                                                   num_detection_tokens=5),
           _images(64), "partly", TABLE, 0.95),
    family("hf-dinov2", _hf("Dinov2Model", "Dinov2Config", **HF, image_size=64, patch_size=8),
           _images(64), "rewritten", prefix=1, budget=0.8),
    # HF puts the registers after the class token once position embeddings are added
    # (cat(x[:, :1], registers, x[:, 1:])): both are protected, as timm's (1 + 4 registers)
    family("hf-dinov2-registers", _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                                      **HF, image_size=64, patch_size=8, num_register_tokens=4),
           _images(64), "rewritten", prefix=5, budget=0.8),
    family("hf-siglip_vision-probe_pool", _hf("SiglipVisionModel", "SiglipVisionConfig", **HF,
                                              image_size=64, patch_size=8),
           _images(64), "rewritten", prefix=0, budget=0.8),
    family("hf-gpt2-causal", _hf("GPT2Model", "GPT2Config", n_embd=64, n_layer=2, n_head=4,
                                 vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0),
           lambda b: (torch.randint(0, 100, (b, 16)),), "refused", "fixed pattern"),
]
_NO_HF = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                            reason="HuggingFace families need transformers (dev extra)")
for f in FAMILIES:
    if f.id.startswith("hf-"):
        f.marks.append(_NO_HF)
CASES += FAMILIES
ZOO = {c.id: c for c in CASES}
assert len(ZOO) == len(CASES), "case ids must be unique"


def case(id: str) -> tuple[nn.Module, tuple, Case]:
    """(built model, inputs at batch 2, the case) for a registry id."""
    c = ZOO[id]
    return built(c), inputs(c, 2), c
