"""The cost model (tome_fx.cost) and FLOP-budget planning (tome_fx.plan / optimize(flops_budget=)).

FLOPs are checked against torch.utils.flop_counter.FlopCounterMode through the tests' counter
(``tests/flops.py``), which registers the formula of every op the cost model prices, so the checks
do not depend on which ops a torch release counts.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tome_fx
from cases import ZOO as ZOO_CASES
from cases import built, inputs
from flops import counted_flops
from tome_fx.api import rewrite
from tome_fx.capture import capture
from tome_fx.cost import Calibration, CostModel, search
from tome_fx.kernels import tome as ops
from models import TwoStage

def _counted(module, inputs) -> int:
    return counted_flops(module, *(inputs if isinstance(inputs, tuple) else (inputs,)))


# registry cases (tests/cases.py) whose cost model is checked against the counter
ZOO = ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
       "vit_small_patch14_reg4_dinov2-224px", "vit_tiny_patch16_224-avgpool-no_cls",
       "nn.TransformerEncoder-postnorm-64d-no_embed"]
ENCODER = "nn.TransformerEncoder-postnorm-64d-no_embed"


@functools.lru_cache(maxsize=None)
def _zoo(name):
    c = ZOO_CASES[name]
    model, x = built(c), inputs(c, 1)
    return model, x, CostModel.build(capture(model, x))


@functools.lru_cache(maxsize=None)
def _vit_small():
    c = ZOO_CASES["vit_small_patch16_224"]
    model, x = built(c), inputs(c, 1)
    return model, x, CostModel.build(capture(model, x)), _counted(model, x)


def test_flop_counter_counts_what_the_cost_model_prices():
    """The tests' counter gives the closed-form FLOPs of fused attention, linear layers, batched
    products and convolutions, whatever this torch release counts by itself."""
    q, k = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 12, 8)
    v = torch.randn(1, 2, 12, 6)
    assert counted_flops(F.scaled_dot_product_attention, q, k, v) == 2 * 2 * 10 * 12 * (8 + 6)
    assert counted_flops(nn.Linear(8, 5), torch.randn(3, 4, 8)) == 2 * 12 * 8 * 5
    assert counted_flops(torch.bmm, torch.randn(2, 3, 4), torch.randn(2, 4, 5)) == 2 * 2 * 3 * 4 * 5
    conv = nn.Conv2d(3, 6, 4, stride=4)
    assert counted_flops(conv, torch.randn(2, 3, 16, 16)) == 2 * (2 * 6 * 4 * 4) * (3 * 4 * 4)


# (a) acceptance: vit_small_patch16_224 at 224 px hits each budget within [b - 0.01, b]
@pytest.mark.parametrize("budget", [0.9, 0.75, 0.5, 0.4])
def test_vit_small_budgets(budget):
    model, x, cm, original = _vit_small()
    schedule, _ = search(cm, budget, "auto")
    gm = rewrite(model, lambda n: schedule, x).graph_module
    ratio = _counted(gm, x) / original
    assert budget - 0.01 <= ratio <= budget, (schedule, ratio)
    assert cm.flops(schedule) == _counted(gm, x)


def test_optimize_flops_budget_end_to_end():
    model, x, cm, original = _vit_small()
    gm = tome_fx.optimize(model, flops_budget=0.5, example_inputs=x)
    ratio = _counted(gm, x) / original
    assert 0.49 <= ratio <= 0.5
    plan = gm.tome
    assert plan.budget == 0.5 and plan.flops == _counted(gm, x)
    assert plan.ratio == pytest.approx(ratio) and plan.predicted_speedup == pytest.approx(1 / ratio)
    assert plan.r == search(cm, 0.5, "auto")[0]


# (b) prediction vs FlopCounterMode within 1% for every zoo model at three budgets
@pytest.mark.parametrize("name", ZOO)
def test_prediction_matches_flop_counter(name):
    model, x, cm = _zoo(name)
    assert cm.flops_original == _counted(model, x)
    smallest = cm.flops(cm.max_schedule()) / cm.flops_original
    for budget, strategy in [(0.85, "constant"), (0.7, "decreasing"), (0.55, "constant")]:
        if budget < smallest:  # not reachable: an error names the smallest ratio ...
            with pytest.raises(ValueError, match=f"{smallest:.4f}"):
                search(cm, budget, strategy)
            budget = math.ceil(smallest * 100) / 100  # ... and the nearest reachable budget
        schedule, _ = search(cm, budget, strategy)
        gm = rewrite(model, lambda n: schedule, x).graph_module
        measured = _counted(gm, x)
        err = abs(cm.flops(schedule) - measured) / measured
        assert err <= 0.01, (name, budget, schedule, cm.flops(schedule), measured)
        assert budget - 0.01 <= measured / cm.flops_original <= budget


# (c) errors name the numbers
def test_budget_errors():
    model, x, cm = _zoo(ENCODER)
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match=str(bad)):
            tome_fx.plan(model, flops_budget=bad, example_inputs=x)
        with pytest.raises(ValueError, match=str(bad)):
            tome_fx.optimize(model, flops_budget=bad, example_inputs=x)
    smallest = cm.flops(cm.max_schedule()) / cm.flops_original
    with pytest.raises(ValueError, match=f"{smallest:.4f}"):
        search(cm, smallest - 0.02)
    with pytest.raises(ValueError, match=f"{smallest:.4f}"):
        tome_fx.plan(model, flops_budget=smallest - 0.02, example_inputs=x)
    with pytest.raises(ValueError, match="example_inputs"):
        tome_fx.plan(model, flops_budget=0.5)  # nn.TransformerEncoder declares no input size
    with pytest.raises(ValueError, match="strategy"):
        tome_fx.plan(model, flops_budget=0.5, example_inputs=x, strategy="random")


# (d) printable per-block table; (e) b = 1 merges nothing
def test_plan_prints_table_and_b1():
    model, x, _ = _zoo(ENCODER)
    plan = tome_fx.plan(model, flops_budget=0.8, example_inputs=x, strategy="constant")
    text = str(plan)
    assert "MFLOPs" in text and "ratio" in text and "speed-up" in text
    lines = text.splitlines()
    for b in plan.blocks:
        assert any(line.split()[:1] == [str(b.index)] and str(b.tokens_in) in line for line in lines)
    assert 0.79 <= plan.ratio <= 0.8
    assert sum(b.flops for b in plan.blocks) <= plan.flops
    full = tome_fx.plan(model, flops_budget=1, example_inputs=x)
    assert full.r == [0] * len(full.blocks) and full.ratio == 1.0


def test_default_inputs_used():
    model, _, _ = _zoo("vit_tiny_patch16_224")
    plan = tome_fx.plan(model, flops_budget=0.7, strategy="constant")  # timm input_size
    assert plan.blocks[0].tokens_in == 197 and 0.69 <= plan.ratio <= 0.7


# (f) the default strategy is at least as faithful as the constant one at the same FLOPs
def test_auto_at_least_as_faithful_as_constant(cifar):
    model, x, _ = cifar
    x = (x,)
    for budget in (0.75, 0.55):  # x are real images: calibration data for auto's family
        auto = tome_fx.plan(model, flops_budget=budget, calibration=x)
        const = tome_fx.plan(model, flops_budget=budget, example_inputs=x, strategy="constant")
        assert auto.r != const.r  # the family, not the data-free rule
        assert abs(auto.ratio - const.ratio) <= 0.01
        assert budget - 0.01 <= auto.ratio <= budget and budget - 0.01 <= const.ratio <= budget
        assert auto.drift <= const.drift, (auto.r, auto.drift, const.r, const.drift)


def test_auto_merges_most_in_free_last_block(cifar):
    # The head reads only the class token, so the last block's merge (before its MLP) cannot
    # move the output: auto must spend it fully there and say so; constant stays the paper's.
    # (With unread tokens dropped, the default, that merge is gone: see the test below.)
    model, x, _ = cifar
    x = (x,)
    plan = tome_fx.plan(model, flops_budget=0.9, example_inputs=x, drop=False)
    last = plan.blocks[-1]
    assert last.r == ops.merge_limit(last.tokens_in, plan.protected) > 0
    assert any("block(s) 5 leaves the calibration outputs unchanged" in n for n in plan.notes)
    assert 0.89 <= plan.ratio <= 0.9
    const = tome_fx.plan(model, flops_budget=0.9, example_inputs=x, strategy="constant", drop=False)
    assert not any("unchanged" in n for n in const.notes)
    assert max(const.r) - min(const.r) <= 2  # no block singled out


def test_dropping_unread_tokens_counts_against_the_original(cifar):
    # The CIFAR ViT's head reads the class token only: its last block computes only that token
    # after attention. The budget stays a fraction of the *original* FLOPs (FlopCounterMode on
    # the user's model), and the closed form matches the dropped graph's measured FLOPs.
    model, x, _ = cifar
    x = (x,)
    cm = CostModel.build(capture(model, x))
    assert cm.flops_original == _counted(model, x)
    assert cm.enabled[-1] is False  # no merge in the dropping block
    dropped_only = cm.flops([0] * cm.num_blocks)
    assert dropped_only < 0.9 * cm.flops_original
    fast = tome_fx.optimize(model, r=0, example_inputs=x)
    assert _counted(fast, x) == dropped_only
    with torch.no_grad():
        torch.testing.assert_close(fast(*x), model(*x), atol=1e-5, rtol=1e-5)
    plan = tome_fx.plan(model, flops_budget=0.8, example_inputs=x)
    last = plan.blocks[-1]
    assert (last.r, last.tokens_out, last.dropped) == (0, 1, last.tokens_in - 1)
    assert any("only the 1 protected token(s)" in n for n in plan.notes)
    assert not any("unchanged" in n for n in plan.notes)  # no free merges left to find
    assert 0.79 <= plan.ratio <= 0.8


def test_no_free_block_with_average_pooling():
    # Average pooling reads every token after the last block: its merge moves the output.
    model, x, cm = _zoo("vit_tiny_patch16_224-avgpool-no_cls")
    assert Calibration(cm).free_blocks() == frozenset()
    plan = tome_fx.plan(model, flops_budget=0.8, example_inputs=x)
    assert not any("unchanged" in n for n in plan.notes)


def test_calibration_on_the_example_inputs_reuses_the_reference_run():
    # optimize(calibration=x) makes x the example inputs too: the cost model already ran the
    # unmerged graph on them, so the calibration must not run it again. Equal values in other
    # tensors are other inputs (the reference is recomputed, and equals the cost model's).
    _, _, cm = _zoo(ENCODER)
    same = Calibration(cm, cm.inputs)
    assert same.reference is cm.reference and same.inputs is cm.inputs
    copied = tuple(t.clone() for t in cm.inputs[0]), dict(cm.inputs[1])
    other = Calibration(cm, copied)
    assert other.reference is not cm.reference
    torch.testing.assert_close(other.reference, cm.reference)
    assert same.drift([1] * cm.num_blocks) == other.drift([1] * cm.num_blocks)


def test_blocks_at_different_token_counts_are_priced():
    """Two stages (64 then 16 tokens): the first stage's merges are switched off (its tokens
    fold into a grid), the second merges; the prediction is the counted FLOPs and the budget
    is met (the closed form used to expect 64 tokens in stage 2: a RuntimeError)."""
    torch.manual_seed(0)
    model, x = TwoStage().eval(), torch.randn(2, 3, 32, 32)
    fast = tome_fx.optimize(model, flops_budget=0.96, example_inputs=(x,))
    plan = fast.tome
    assert [b.tokens_in for b in plan.blocks][:3] == [64, 64, 16]
    assert plan.r[:2] == [0, 0] and plan.r[2] > 0 and plan.blocks[3].tokens_in == 16 - plan.r[2]
    assert plan.flops == _counted(fast, x) and 0.95 <= plan.flops / _counted(model, x) <= 0.96
    with pytest.raises(ValueError, match=r"^flops_budget=0.5 is below the smallest reachable"):
        tome_fx.optimize(model, flops_budget=0.5, example_inputs=(x,))


def test_token_count_links():
    """Which earlier block's tokens enter each block, from the counts without merging and at the
    most merging; a count no link explains is a reason, not an exception."""
    from tome_fx.cost.model import _links

    assert _links((64, 64, 16, 16), (64, 60, 16, 12), (4, 0, 4, 4)) == (-1, 0, -1, 2)
    assert _links((8, 8), (8, 8), (0, 0)) == (-1, 0)
    why = _links((64, 64), (64, 50), (4, 4))
    assert isinstance(why, str) and why.startswith("the cost model cannot price merging: block 1")


def test_diffusers_unet_budget_is_a_warning_not_an_internal_error():
    """A UNet's transformer blocks sit at two token counts (8x8 and 4x4 latents) and every
    merge is refused (merged tokens would reach the text cross-attention's queries, or fold into
    the grid): flops_budget ends in the usual warning, with the model's output unchanged."""
    diffusers = pytest.importorskip("diffusers", reason="the UNet case needs diffusers (dev extra)")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8, up_block_types=("UpBlock2D", "UpBlock2D"),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")).eval()
    x = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 4, 32))
    with pytest.warns(UserWarning, match=r"^flops_budget=0.5 is not met"):
        fast = tome_fx.optimize(unet, flops_budget=0.5, example_inputs=x)
    plan = fast.tome
    assert [b.tokens_in for b in plan.blocks] == [64, 16] and plan.r == [0, 0]
    attn1 = [s.reason for s in plan.skipped if "attn1" in s.site]
    assert len(attn1) == 2 and all("cross-attention" in r or "folds" in r for r in attn1), attn1
    with torch.no_grad():
        assert (fast(*x).sample - unet(*x).sample).abs().max() <= 1e-5
