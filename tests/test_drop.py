"""Dropping the tokens the output never reads after the last attention (tome_fx/passes/drop.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import tome_fx
from cases import timm_model
from tome_fx import graph as gu
from tome_fx.capture import capture
from tome_fx.checks.drop import check_drop
from tome_fx.passes.drop import drop_unread
from tome_fx.pipeline import analyse

from models import SoftmaxAttention, TinyTransformer


class _Readout(nn.Module):
    """Class token in front, explicit-softmax pre-norm blocks, then ``readout(tokens)``."""

    def __init__(self, readout, dim=32, depth=2):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.attn = nn.ModuleList([SoftmaxAttention(dim, 4) for _ in range(depth)])
        self.mlp = nn.ModuleList([nn.Linear(dim, dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.readout = readout

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(self.norm(x))
            x = x + mlp(self.norm(x))
        return self.readout(x)


def small_vit(name, **kw):
    return timm_model(name, img_size=64, depth=3, **kw)


# name -> (model, input, tokens kept after the last attention)
CASES = {
    "timm_vit_class_token": (lambda: small_vit("vit_tiny_patch16_224"), (2, 3, 64, 64), 1),
    "timm_deit_distilled": (lambda: small_vit("deit_tiny_distilled_patch16_224"), (2, 3, 64, 64), 2),
    "timm_vit_registers": (lambda: small_vit("vit_tiny_patch16_224", reg_tokens=2), (2, 3, 64, 64), 3),
    "explicit_softmax_prenorm": (lambda: TinyTransformer().eval(), (2, 33, 16), 1),
    "readout_token_0": (lambda: _Readout(lambda x: x[:, 0]).eval(), (2, 12, 16), 1),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("r", [0, 3])
def test_drop_is_exact_and_saves_work(name, r):
    build, shape, kept = CASES[name]
    torch.manual_seed(1)
    model, x = build(), torch.randn(*shape)
    before = copy.deepcopy(model.state_dict())
    fast = tome_fx.optimize(model, r=r, example_inputs=(x,))
    plain = tome_fx.optimize(model, r=r, example_inputs=(x,), drop_unread=False)
    assert fast.tome_counts["drop_unread"] == 1 and plain.tome_counts["drop_unread"] == 0
    last = fast.tome.blocks[-1]
    assert (last.r, last.tokens_out, last.dropped) == (0, kept, last.tokens_in - kept)
    assert fast.tome.r[:-1] == plain.tome.r[:-1]
    # the last block's own merge cannot reach the output: both graphs compute the same function
    with torch.no_grad():
        want = plain(x)
        torch.testing.assert_close(fast(x), want, atol=1e-5, rtol=1e-5)
        if r == 0:
            torch.testing.assert_close(want, model(x), atol=1e-5, rtol=1e-5)
    # one attention per block still (the last one replaced by its narrowed copy)
    attn = lambda gm: sum(gu.is_sdpa(n) or gu.is_softmax(gm, n) for n in gm.graph.nodes)  # noqa: E731
    assert attn(fast) == attn(plain) == len(fast.tome.blocks)
    assert any(n.meta.get("tome", {}).get("role") == "keep" for n in fast.graph.nodes)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # not mutated


@pytest.mark.parametrize("readout, reason", [
    (lambda x: x.mean(1), "mean over the token dimension"),
    (lambda x: x, "output keeps the token dimension"),
    (lambda x: x[:, 0] + x[:, 5], "index 5 is out of bounds"),
    (lambda x: x.max(1).values, "has no size-weighted form"),
])
def test_drop_refused_where_other_tokens_are_read(readout, reason):
    torch.manual_seed(0)
    model, x = _Readout(readout).eval(), torch.randn(2, 12, 16)
    ctx = analyse(capture(model, (x,)))
    assert ctx.matches.prefix == 1
    done = drop_unread(ctx)
    assert done.count == 1
    assert reason in check_drop(ctx, done.info)
    # optimize leaves such a model's last block to its merge, and its function intact
    fast = tome_fx.optimize(model, r=0, example_inputs=(x,))
    assert fast.tome_counts["drop_unread"] == 0 and fast.tome.blocks[-1].dropped == 0
    assert any(n.startswith("unread tokens are not dropped") and reason in n
               for n in fast.tome.notes)
    # ToMato too: redone without the drop (an infinite threshold merges nothing)
    tomato = tome_fx.optimize(model, method="tomato", sim_threshold=float("inf"), grid=(3, 4),
                              example_inputs=(x,))
    assert tomato.tome_counts["drop_unread"] == 0 and tomato.tome.blocks[-1].dropped == 0
    assert any(n.startswith("unread tokens are not dropped") for n in tomato.tome.notes)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tomato(x), model(x), atol=1e-5, rtol=1e-5)


def test_no_prefix_no_drop():
    model = small_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg")
    x = torch.randn(2, 3, 64, 64)
    fast = tome_fx.optimize(model, r=2, example_inputs=(x,))
    assert fast.tome_counts["drop_unread"] == 0 and fast.tome.r == [2, 2, 2]
    assert "unread tokens are not dropped: no protected prefix token" in fast.tome.notes[-1]
