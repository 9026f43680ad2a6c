"""Honest refusal: attention whose result depends on token positions is never rewritten.

Merged tokens have no single position, so attention with windows (Swin), a relative-position
bias table (BEiT, Swin), rotary embeddings (EVA-02), a causal mask (decoder LMs), or a per-block
position table must not see merged tokens. For each model: the blocks whose merges would reach
such attention are skipped, ``explain()`` lists each with a reason naming the cause, and
``optimize(model, r=...)`` returns the original function (<= 1e-5) where blocks were skipped.
Merges whose tokens reach no position-dependent op (the last block of a rotary model: its merge
comes after its own attention) stay, and are checked to be the only ones.
"""
from __future__ import annotations

import pytest
import torch

import tome_fx
from cases import timm_model
from zoo_checks import max_diff
import models as zm

POSITION = "indexed by token position"  # the matcher's reason for position-dependent terms


def _hand(make, **kw):
    torch.manual_seed(0)
    return zm.Encoder(make, **kw).eval()


def _per_block_position():
    model = _hand(lambda d: zm.SoftmaxAttention(d, 4))
    for i in range(len(model.blocks)):
        model.blocks[i] = zm.PerBlockPosition(32)
    return model.eval()


def _gpt(fused):
    torch.manual_seed(0)
    return zm.TinyGPT(fused=fused).eval()


def _image(size):
    return lambda: (torch.randn(2, 3, size, size),)


def _tokens():
    return (torch.randn(2, 32, 16),)


# id -> (model, inputs, reason words, how many blocks may keep merging at the end)
CASES = {
    # Swin: windowed attention with a relative-position-bias table (and a shifted-window mask)
    "swin_tiny_patch4_window7_224-depths1121": (
        lambda: timm_model("swin_tiny_patch4_window7_224", depths=(1, 1, 2, 1)), _image(224),
        [POSITION], 0),
    # BEiT: relative-position-bias table passed to SDPA as attn_mask
    "beit_base_patch16_224-d2-112px": (
        lambda: timm_model("beit_base_patch16_224", depth=2, img_size=112), _image(112),
        [POSITION], 0),
    # EVA-02: rotary embedding of q/k per patch position (a fixed table); the last block's merge
    # comes after its own attention, reaches no rotary table, and is kept
    "eva02_tiny_patch14_224-d3-112px": (
        lambda: timm_model("eva02_tiny_patch14_224", depth=3, img_size=112), _image(112),
        ["rotary"], 1),
    # decoder LMs: causal SDPA, and a causal mask built with tril for the current length
    "gpt-causal-sdpa": (lambda: _gpt(True), lambda: (torch.randint(0, 50, (2, 32)),),
                        ["causal"], 0),
    "gpt-causal-tril-mask": (lambda: _gpt(False), lambda: (torch.randint(0, 50, (2, 32)),),
                             [POSITION], 0),
    # hand-written: windows without a bias; a relative-position table sliced to the length
    # (explicit softmax and SDPA); rotary built from the current length; a position embedding
    # added inside every block
    "window-attention": (lambda: _hand(lambda d: zm.WindowAttention(d, 4), cls=False, pool="mean"),
                         _tokens, ["windowed"], 0),
    "relpos-table-softmax": (lambda: _hand(lambda d: zm.RelPosBiasAttention(d, 4)), _tokens,
                             [POSITION], 0),
    "relpos-table-sdpa": (lambda: _hand(lambda d: zm.SdpaRelPosAttention(d, 4)), _tokens,
                          [POSITION], 0),
    "rotary-from-length": (lambda: _hand(lambda d: zm.RotaryAttention(d, 4)), _tokens,
                           ["built from the token count"], 1),
    "position-embedding-per-block": (_per_block_position, _tokens,
                                     ["built from the token count"], 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_position_dependent_attention_is_refused(name):
    build, make_inputs, words, kept = CASES[name]
    model = build()
    x = make_inputs()
    # drop_unread=False: trailing blocks merge (else the last one keeps only the class token)
    fast = tome_fx.optimize(model, r=2, example_inputs=x, drop_unread=False)
    plan = fast.tome
    reasons = [s.reason for s in plan.skipped]
    assert reasons, "nothing was skipped"
    for reason in reasons:
        assert any(w in reason for w in words), reason
    # explain() lists the same skipped sites with the same reasons
    explained = tome_fx.explain(model, example_inputs=x, r=2, drop_unread=False)
    assert [(s.site, s.reason) for s in explained.skipped] == [(s.site, s.reason) for s in plan.skipped]
    assert all(s.site in str(explained) for s in explained.skipped)

    merging = [b.index for b in plan.blocks if b.r > 0]
    assert fast.tome_counts["merges"] == len(merging)
    # only the trailing blocks whose merges meet no position-dependent op keep merging
    assert merging == [b.index for b in plan.blocks][len(plan.blocks) - kept:]
    with torch.no_grad():
        ref = model(*x)
        if not merging:  # everything skipped: the original function
            assert max_diff(fast(*x), ref) <= 1e-5
        # r on the skipped blocks only: the original function
        only_skipped = [0 if b.index in merging else 2 for b in plan.blocks]
        same = tome_fx.optimize(model, r=only_skipped, example_inputs=x)
        assert same.tome_counts["merges"] == 0
        assert max_diff(same(*x), ref) <= 1e-5


def test_windowed_attention_is_not_merged_across_windows_by_coincidence():
    """Batch size equal to the window size: the shapes of stream and windows look like a
    sequence-first layout, so only running the block tells (tome_fx/checks/token_probe.py)."""
    model = _hand(lambda d: zm.WindowAttention(d, 4), cls=False, pool="mean")
    x = (torch.randn(4, 32, 16),)
    fast = tome_fx.optimize(model, r=2, example_inputs=x)
    with torch.no_grad():
        assert fast.tome_counts["merges"] == 0
        assert max_diff(fast(*x), model(*x)) <= 1e-5
    # named from the graph (the reshape into windows), before any run
    assert any("windowed attention: the block regroups the tokens" in s.reason
               for s in fast.tome.skipped)
