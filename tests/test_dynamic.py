"""Any input shape: token counts free at run time.

torch.export captures every dimension the model allows as dynamic (a sequence length, the image
size of a model that interpolates its position embedding); a ``flops_budget`` schedule merges
each block's share of its tokens, so the FLOP ratio holds at every length; lengths the module
cannot take raise the one-line ``ShapeError``.
"""
import functools

import pytest
import torch

import tome_fx
from tome_fx import graph as gu
from tome_fx.kernels.tome import merge_count
from cases import timm_model
from flops import counted_flops
from models import TinyTransformer

BERT = dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
            vocab_size=1000, max_position_embeddings=256)


@functools.lru_cache(maxsize=None)
def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**BERT)).eval()


def _text(n, batch=2):
    """Token ids and a padding mask: the second sequence is padded from 3/4 of ``n`` on."""
    ids = torch.randint(0, 1000, (batch, n), generator=torch.Generator().manual_seed(n))
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[1, n * 3 // 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@functools.lru_cache(maxsize=None)
def _bert_fast(**kw):
    return tome_fx.optimize(_bert(), example_inputs=_text(32), **kw)


def test_merge_count_scales_with_the_token_count():
    """``(kept, of)``: exactly ``kept`` tokens remain at ``of`` tokens; at any other count the
    remaining tokens are within half a token of the same share, never below the prefix, and do
    not depend on how many tokens this merge gets (only on the first merge's count)."""
    for of in (17, 32, 197):
        for kept in range(1, of + 1):
            assert of - merge_count((kept, of), of, 1) == kept
            for start in (2, 5, 16, 100, 325):
                remaining = start - merge_count((kept, of), start, 1)
                share = kept / of * start
                assert remaining == max(round(share - 1e-9), 1) or abs(remaining - share) <= 0.5
                assert remaining >= 1
                later = start - 1 - merge_count((kept, of), start - 1, 1, start=start)
                assert later == remaining
    assert merge_count(7, 50, 1) == 7  # an int r is ToMe's r


def test_export_captures_the_sequence_length_dynamic():
    fast = _bert_fast(r=2)
    assert fast.tome.frontend == "export"
    assert any("input_ids" in n and "dynamic" in n for n in fast.tome.notes), fast.tome.notes


@pytest.mark.parametrize("n", [16, 48, 128])
def test_bert_budget_holds_at_every_length(n):
    """Optimized on 32-token examples, run on 16, 48 and 128 tokens with padding: the FLOP
    ratio stays in [0.47, 0.52], and the padded sequence gets what it gets alone at its length
    (padding never merges with real tokens)."""
    fast = _bert_fast(flops_budget=0.5)
    assert fast.tome.scales and "r / tokens" in str(fast.tome)
    x = _text(n)
    with torch.no_grad():
        ratio = counted_flops(fast, **x) / counted_flops(_bert(), **x)
        assert 0.47 <= ratio <= 0.52, ratio
        out = fast(**x).logits
        assert out.shape == (2, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("n", [16, 48, 128])
def test_bert_r0_equals_the_original_at_every_length(n):
    fast = _bert_fast(r=0)
    x = _text(n)
    with torch.no_grad():
        torch.testing.assert_close(fast(**x).logits, _bert()(**x).logits, rtol=0, atol=1e-6)


def test_lengths_the_module_cannot_take_raise_shape_error():
    fast = _bert_fast(flops_budget=0.5)
    with pytest.raises(tome_fx.ShapeError, match=r"^input_ids has 300 tokens; the model's "
                       r"position table holds 256 \(bert.embeddings.position_embeddings.weight: "
                       r"256 rows; max_position_embeddings=256\)$"):
        fast(**_text(300))  # longer than the position table
    x = _text(24)
    x["attention_mask"] = x["attention_mask"][:, :20]
    with pytest.raises(tome_fx.ShapeError, match=r"must equal 'input_ids' dimension 1 \(24\)"):
        fast(**x)


def test_timm_dynamic_img_size_budget_holds_at_every_resolution():
    """ViT-S/16 with ``dynamic_img_size=True`` optimized at 224 px runs at 160, 224 and 288 px
    with the FLOP ratio within 0.02 of the budget; with its merges at r=0 it computes the
    original at every resolution."""
    model = timm_model("vit_small_patch16_224", dynamic_img_size=True)
    fast = tome_fx.optimize(model, flops_budget=0.5, example_inputs=torch.randn(2, 3, 224, 224))
    with torch.no_grad():
        for px in (160, 224, 288):
            x = torch.randn(1, 3, px, px)
            ratio = counted_flops(fast, x) / counted_flops(model, x)
            assert abs(ratio - 0.5) <= 0.02, (px, ratio)
            with gu.merges_at(fast, 0):
                torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-5)


def test_fx_capture_scales_too():
    """A model torch.fx traces takes any token count as it is; the budget schedule scales."""
    torch.manual_seed(0)
    model = TinyTransformer(depth=6).eval()
    fast = tome_fx.optimize(model, flops_budget=0.6, example_inputs=torch.randn(2, 65, 16))
    assert fast.tome.frontend == "fx"
    for n in (33, 65, 129):
        x = torch.randn(2, n, 16)
        ratio = counted_flops(fast, x) / counted_flops(model, x)
        assert abs(ratio - 0.6) <= 0.02, (n, ratio)


def test_tomato_at_another_grid_raises_shape_error():
    """ToMato merges over the example's patch grid: another resolution is an error, not a guess."""
    model = timm_model("vit_tiny_patch16_224", dynamic_img_size=True, depth=4, img_size=64)
    fast = tome_fx.optimize(model, method="tomato", flops_budget=0.7,
                            example_inputs=torch.randn(2, 3, 64, 64))
    assert fast(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(tome_fx.ShapeError, match=r"4x4 patch grid .* got 36"):
        fast(torch.randn(1, 3, 96, 96))
