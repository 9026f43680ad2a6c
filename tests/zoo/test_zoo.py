"""Model zoo: timm vision transformers and plain-PyTorch transformers that tome_fx rewrites.

Parametrized like timm's tests/test_models.py over the one registry (``tests/cases.py``): one id
per model. Every model is built from its config with random weights (``pretrained=False``;
nothing is downloaded). The default cases are shrunk (fewer blocks, smaller images) so the zoo
stays fast on a 2-core CPU, keeping each architecture feature (class/distillation/register tokens, LayerScale, pre-norm, q/k-norm,
average pooling, fc_norm); the full-size ViTs at 224 and 384 are marked slow. The expected block
count and protected tokens come from each model's config (``len(model.blocks)``,
``model.num_prefix_tokens``).

Checks per model (tests/zoo/zoo_checks.py): r=0 unchanged at batch 1 and 3; for the models that
merge, the case's flops_budget (0.5 unless the case says) reached as measured by FlopCounterMode
and equal to the cost model's prediction, merges happened, finite outputs at batch 1 and 3,
backward reaches the same parameters, finite; for the models refused in whole or in part
(the wider families at the end of tests/cases.py), every refusal gives the case's reason, and a
model refused in whole computes the original's output.
"""
from __future__ import annotations

import pytest
import torch

from cases import ZOO, built
from zoo_checks import check_budget, check_r0, check_refused

# a model refused in whole is checked once, at r=4 (its output is the original's, with reasons)
MERGING = [c.param() for c in ZOO.values() if c.outcome != "refused"]
REFUSING = [c.param() for c in ZOO.values() if c.outcome != "rewritten"]


@pytest.mark.parametrize("case", MERGING)
def test_r0_unchanged(case):
    check_r0(case)


@pytest.mark.parametrize("case", MERGING)
def test_budget(case):
    check_budget(case, case.budget)


@pytest.mark.parametrize("case", REFUSING)
def test_refusals_say_why(case):
    check_refused(case)


def test_zoo_covers_features():
    """The shrunk cases keep the features they are named for (read from the built models)."""
    m = built(ZOO["deit_tiny_distilled_patch16_224-d4-96px"])
    assert m.num_prefix_tokens == 2 and len(m.blocks) == 4
    m = built(ZOO["deit3_small_patch16_224-layerscale-d4-96px"])
    assert type(m.blocks[0].ls1).__name__ == "LayerScale"
    m = built(ZOO["vit_small_patch14_reg4_dinov2-d4-84px"])
    assert m.num_reg_tokens == 4 and m.num_prefix_tokens == 5
    m = built(ZOO["vit_tiny_patch16_224-reg_tokens4-d4-96px"])
    assert m.num_reg_tokens == 4 and m.num_prefix_tokens == 5
    m = built(ZOO["vit_base_patch16_clip_224-norm_pre-d4-96px"])
    assert isinstance(m.norm_pre, torch.nn.LayerNorm)
    m = built(ZOO["vit_tiny_patch16_224-avgpool-no_cls-d4-96px"])
    assert m.num_prefix_tokens == 0 and m.global_pool == "avg"
    m = built(ZOO["vit_small_patch16_224-mae_style-avg-fc_norm-d4-96px"])
    assert m.global_pool == "avg" and isinstance(m.fc_norm, torch.nn.LayerNorm)
    m = built(ZOO["vit_small_patch16_224-qk_norm-d4-96px"])
    assert isinstance(m.blocks[0].attn.q_norm, torch.nn.LayerNorm)
