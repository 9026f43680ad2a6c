"""Dense outputs: merged tokens go back to the original token layout (``unmerge``).

Every original token gets a copy of the merged token that holds it, checked against the
independent source tracking (``track_sources``); outputs keep their shape, a Segmenter-style
decoder that folds the tokens into a grid is rewritten instead of refused, and budgets stay
exact because the cost model prices what runs after the unmerge.
"""
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tome_fx
from tome_fx.capture.export import export_program
from cases import timm_model
from flops import counted_flops


def _groups_agree(unmerged, sources, prefix):
    """Each merged token's original tokens hold the same row of ``unmerged`` [B, N0, ...], and
    every original token belongs to exactly one merged token."""
    member = sources > 0.5  # [B, N, N0]
    assert torch.equal(member.sum(1), torch.ones_like(member.sum(1)))
    for b in range(member.shape[0]):
        for row in member[b]:
            idx = row.nonzero().flatten()
            assert torch.equal(unmerged[b, idx], unmerged[b, idx[:1]].expand_as(unmerged[b, idx]))
    for p in range(prefix):
        assert bool(member[:, p, p].all())  # protected tokens stay alone, in place


def test_timm_features_come_back_in_the_original_layout():
    model = timm_model("vit_small_patch16_224", num_classes=0, global_pool="")
    x = torch.randn(2, 3, 224, 224)
    fast = tome_fx.optimize(model, flops_budget=0.5, example_inputs=x)
    assert fast.tome_counts["unmerge"] == 1 and sum(fast.tome.r) > 0
    assert any("unmerged to the original token layout before output" in n for n in fast.tome.notes)
    tracked = tome_fx.track_sources(fast, x)
    out = tracked.output
    assert out.shape == (2, 197, 384)
    with torch.no_grad():
        assert torch.equal(fast(x), out)
        _groups_agree(out, tracked.at(len(fast.tome.blocks) - 1), fast.tome.protected)
        same = tome_fx.optimize(model, r=0, example_inputs=x)
        assert torch.equal(same(x), model(x))


@functools.lru_cache(maxsize=None)
def _token_classifier():
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128, vocab_size=1000, num_labels=7)
    return BertForTokenClassification(config).eval()


def _text():
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_token_classification_keeps_one_output_per_token():
    """HF BertForTokenClassification with padding: logits [B, N, labels] at budget 0.5, each
    output row a copy of its group's, and no group mixes padding with real tokens."""
    model, x = _token_classifier(), _text()
    fast = tome_fx.optimize(model, flops_budget=0.5, example_inputs=x)
    tracked = tome_fx.track_sources(fast, **x)
    logits = tracked.output.logits
    assert logits.shape == (2, 32, 7) and fast.tome_counts["merges"] > 0
    sources = tracked.at(len(fast.tome.blocks) - 1)
    _groups_agree(logits, sources, fast.tome.protected)
    real = x["attention_mask"].bool()
    member = sources > 0.5
    for b in range(2):
        for row in member[b]:
            kinds = real[b][row]
            assert bool(kinds.all()) or not bool(kinds.any())  # never padding with real
    with torch.no_grad():
        ratio = counted_flops(fast, **x) / counted_flops(model, **x)
        assert 0.49 <= ratio <= 0.5
        same = tome_fx.optimize(model, r=0, example_inputs=x)
        assert torch.equal(same(**x).logits, model(**x).logits)


class Segmenter(nn.Module):
    """ViT encoder, per-token linear decoder, tokens reshaped to [B, C, H/16, W/16] and
    upsampled (Strudel et al.'s linear decoder)."""

    def __init__(self, classes=5):
        super().__init__()
        self.vit = timm_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=0,
                              global_pool="")
        self.decoder = nn.Linear(192, classes)

    def forward(self, x):
        logits = self.decoder(self.vit(x)[:, 1:])  # patch tokens only
        grid = logits.transpose(1, 2).reshape(x.shape[0], -1, x.shape[2] // 16, x.shape[3] // 16)
        return F.interpolate(grid, size=x.shape[-2:], mode="bilinear")


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("budget", [0.75, 0.5])
def test_segmenter_is_rewritten_within_budget(budget, frontend):
    """On the export path the fold's size argument is a baked literal: shape repair leaves it,
    and the token-flow check's run at r=1 stops there and unmerges before it."""
    torch.manual_seed(0)
    model, x = Segmenter().eval(), torch.randn(2, 3, 64, 64)
    source = model if frontend == "fx" else export_program(model, (x,), {})
    fast = tome_fx.optimize(source, flops_budget=budget, example_inputs=x)
    assert fast.tome.frontend == frontend
    assert fast.tome_counts["unmerge"] == 1 and fast.tome_counts["merges"] > 0
    assert not fast.tome.skipped
    with torch.no_grad():
        assert fast(x).shape == (2, 5, 64, 64)
        ratio = counted_flops(fast, x) / counted_flops(model, x)
    assert budget - 0.01 <= ratio <= budget, ratio


def test_unmerge_modes():
    """False keeps merged outputs and refuses the grid fold; "outputs" unmerges outputs only."""
    torch.manual_seed(0)
    model, x = Segmenter().eval(), torch.randn(2, 3, 64, 64)
    off = tome_fx.optimize(model, r=2, example_inputs=x, unmerge=False)
    assert off.tome_counts["unmerge"] == 0 and off.tome_counts["merges"] == 0
    assert all("reshape_8" in s.reason for s in off.tome.skipped) and off.tome.skipped
    outputs = tome_fx.optimize(model, r=2, example_inputs=x, unmerge="outputs")
    assert outputs.tome_counts["merges"] == 0  # the fold is not an output
    features = timm_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=0,
                          global_pool="")
    merged = tome_fx.optimize(features, r=4, example_inputs=x, unmerge=False)
    dense = tome_fx.optimize(features, r=4, example_inputs=x, unmerge="outputs")
    with torch.no_grad():
        assert merged(x).shape == (2, 17 - 8, 192) and dense(x).shape == (2, 17, 192)
    with pytest.raises(ValueError, match="unmerge must be 'auto', 'outputs' or False"):
        tome_fx.optimize(features, r=4, example_inputs=x, unmerge="yes")


def test_report_says_where_it_unmerged(tmp_path, capsys):
    from tome_fx import cli

    features = timm_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=0,
                          global_pool="")
    x = torch.randn(2, 3, 64, 64)
    torch.export.save(torch.export.export(features, (x,)), tmp_path / "features.pt2")
    assert cli.main(["report", str(tmp_path / "features.pt2"), "--r", "2"]) in (0, None)
    out = capsys.readouterr().out
    assert "unmerged to the original token layout before output" in out
