"""The one model registry of the tests: every zoo model, by id.

Like timm's tests/test_models.py: each ``Case`` builds its model from a config with random
weights (``pretrained=False``; nothing is downloaded) and says what the plan must show, read
from the model (blocks, protected prefix tokens, pooled outputs). ``tests/zoo/test_zoo.py``
checks every case; other test files pick cases by id. Cases at full size are marked slow.
"""
from __future__ import annotations

import functools
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
    blocks: Callable[[nn.Module], int]  # expected attention->MLP blocks, from the config
    prefix: Callable[[nn.Module], int]  # expected protected tokens, from the config
    pools: Callable[[nn.Module], bool]  # the output is a mean over tokens (size-weighted)
    slow: bool = False
    marks: list = field(default_factory=list)

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
ZOO = {c.id: c for c in CASES}
assert len(ZOO) == len(CASES), "case ids must be unique"


def case(id: str) -> tuple[nn.Module, tuple, Case]:
    """(built model, inputs at batch 2, the case) for a registry id."""
    c = ZOO[id]
    return built(c), inputs(c, 2), c
