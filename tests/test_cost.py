"""The cost model (tome_fx.cost) and FLOP-budget planning (tome_fx.plan / optimize(flops_budget=)).

FLOPs are checked against torch.utils.flop_counter.FlopCounterMode through the tests' counter
(``tests/flops.py``), which registers the formula of every op the cost model prices, so the checks
do not depend on which ops a torch release counts.
"""
from __future__ import annotations

import functools
import os
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import tome_fx
from flops import counted_flops
from tome_fx.api import rewrite
from tome_fx.capture import capture
from tome_fx.cost import Calibration, CostModel, search
from tome_fx.kernels import tome as ops

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from cifar_vit import CifarViT  # noqa: E402  (the architecture of ../shared/models/vit_cifar10.pth)


def _counted(module, inputs) -> int:
    return counted_flops(module, *(inputs if isinstance(inputs, tuple) else (inputs,)))


def _timm(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, **kw).eval()  # random weights, never pretrained


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=False)
    return nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()


def _image(size=224, batch=1):
    torch.manual_seed(1)
    return (torch.randn(batch, 3, size, size),)


ZOO = {
    "vit_tiny_patch16_224": (lambda: _timm("vit_tiny_patch16_224"), _image),
    "deit_tiny_distilled": (lambda: _timm("deit_tiny_distilled_patch16_224"), _image),
    "dinov2_reg4_224": (lambda: _timm("vit_small_patch14_reg4_dinov2", img_size=224), _image),
    "vit_avgpool_no_cls": (
        lambda: _timm("vit_tiny_patch16_224", global_pool="avg", class_token=False), _image),
    "torch_encoder_postnorm": (_encoder, lambda: (torch.randn(2, 50, 64),)),
}


@functools.lru_cache(maxsize=None)
def _zoo(name):
    make, inputs = ZOO[name]
    model, x = make(), inputs()
    return model, x, CostModel.build(capture(model, x))


@functools.lru_cache(maxsize=None)
def _vit_small():
    model, x = _timm("vit_small_patch16_224"), _image()
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
@pytest.mark.parametrize("name", list(ZOO))
def test_prediction_matches_flop_counter(name):
    model, x, cm = _zoo(name)
    assert cm.flops_original == _counted(model, x)
    worst = 0.0
    for budget, strategy in [(0.85, "constant"), (0.7, "decreasing"), (0.55, "constant")]:
        if cm.flops(cm.max_schedule()) > budget * cm.flops_original:
            budget = 0.99  # not reachable on this (small) model: use a near-1 budget
        schedule, _ = search(cm, budget, strategy)
        gm = rewrite(model, lambda n: schedule, x).graph_module
        measured = _counted(gm, x)
        err = abs(cm.flops(schedule) - measured) / measured
        worst = max(worst, err)
        assert err <= 0.01, (name, budget, schedule, cm.flops(schedule), measured)
        assert budget - 0.01 <= measured / cm.flops_original <= budget
    print(name, "worst relative prediction error", worst)


# (c) errors name the numbers
def test_budget_errors():
    model, x, cm = _zoo("torch_encoder_postnorm")
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
    model, x, _ = _zoo("torch_encoder_postnorm")
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
def _cifar():
    """Real weights and real images where ../shared has them, else random weights (noted)."""
    weights = os.path.join(SHARED, "models", "vit_cifar10.pth")
    data = os.path.join(SHARED, "data", "cifar10_test.npz")
    model = CifarViT()
    if os.path.exists(weights) and os.path.exists(data):
        model.load_state_dict(torch.load(weights, map_location="cpu"), strict=True)
        images = np.load(data)["images"][:64]
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
        std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
        return model.eval(), ((x - mean) / std,), True
    torch.manual_seed(0)  # random weights: the comparison still holds on the calibration inputs
    return model.eval(), (torch.randn(64, 3, 32, 32),), False


def test_auto_at_least_as_faithful_as_constant():
    model, x, real = _cifar()
    for budget in (0.75, 0.55):
        auto = tome_fx.plan(model, flops_budget=budget, example_inputs=x)
        const = tome_fx.plan(model, flops_budget=budget, example_inputs=x, strategy="constant")
        assert abs(auto.ratio - const.ratio) <= 0.01
        assert budget - 0.01 <= auto.ratio <= budget and budget - 0.01 <= const.ratio <= budget
        assert auto.drift <= const.drift, (auto.r, auto.drift, const.r, const.drift)
        print(f"b={budget} real={real}: auto {auto.r} drift {auto.drift:.4g}; "
              f"constant {const.r} drift {const.drift:.4g}")


def test_auto_merges_most_in_free_last_block():
    # The head reads only the class token, so the last block's merge (before its MLP) cannot
    # move the output: auto must spend it fully there and say so; constant stays the paper's.
    # (With unread tokens dropped, the default, that merge is gone: see the test below.)
    model, x, _ = _cifar()
    plan = tome_fx.plan(model, flops_budget=0.9, example_inputs=x, drop=False)
    last = plan.blocks[-1]
    assert last.r == ops.merge_limit(last.tokens_in, plan.protected) > 0
    assert any("block(s) 5 leaves the calibration outputs unchanged" in n for n in plan.notes)
    assert 0.89 <= plan.ratio <= 0.9
    const = tome_fx.plan(model, flops_budget=0.9, example_inputs=x, strategy="constant", drop=False)
    assert not any("unchanged" in n for n in const.notes)
    assert max(const.r) - min(const.r) <= 2  # no block singled out


def test_dropping_unread_tokens_counts_against_the_original():
    # The CIFAR ViT's head reads the class token only: its last block computes only that token
    # after attention. The budget stays a fraction of the *original* FLOPs (FlopCounterMode on
    # the user's model), and the closed form matches the dropped graph's measured FLOPs.
    model, x, _ = _cifar()
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
    model, x, cm = _zoo("vit_avgpool_no_cls")
    assert Calibration(cm).free_blocks() == frozenset()
    plan = tome_fx.plan(model, flops_budget=0.8, example_inputs=x)
    assert not any("unchanged" in n for n in plan.notes)
