"""The torch.export capture path on plain PyTorch models: ATen recognisers, shape repair, and
agreement with the fx path on the same model."""
import functools
import sys

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn as nn

import tome_fx
from tome_fx import graph as gu
from tome_fx.capture import capture
from tome_fx.capture.export import export_program
from models import SoftmaxAttention, TinyTransformer


def _export(model, x):
    return export_program(model, (x,), {})


def _tiny(depth=4):
    torch.manual_seed(0)
    return TinyTransformer(depth=depth).eval()


@functools.lru_cache(maxsize=None)
def _tiny_exported(depth=4):
    """(model, example input, its ExportedProgram); optimize never mutates either."""
    model, x = _tiny(depth), torch.randn(2, 32, 16)
    return model, x, _export(model, x)


def test_aten_recognisers():
    """The same recognisers answer for the fx graph and the ATen graph of one model."""
    model, x, ep = _tiny_exported(depth=2)
    fx_gm = capture(model, (x,)).graph_module
    ex = capture(ep)
    assert ex.frontend == "export"
    gm = ex.graph_module
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "aten.linear.default" in targets and "aten.softmax.int" in targets  # ATen-level

    def census(g):
        nodes = list(g.graph.nodes)
        return {
            "softmax": sum(gu.is_softmax(g, n) for n in nodes),
            "matmul": sum(gu.is_matmul(n) for n in nodes),
            "norm": sum(gu.is_norm(g, n) for n in nodes),
            "linear": sum(gu.is_linear(g, n) for n in nodes),
        }

    assert census(gm) == census(fx_gm) == {"softmax": 2, "matmul": 4, "norm": 4, "linear": 10}
    assert sum(gu.is_add(n) for n in gm.graph.nodes) >= 4  # two residual adds per block


@pytest.mark.parametrize("r", [2, 5, (4, -1)], ids=["r2", "r5", "r4_inflect-1"])
def test_export_path_equals_fx_path(r):
    """Same model, same r: the export graph (baked token counts, repaired) computes exactly what
    the fx graph (sizes read at run time) computes, at the example batch and at others."""
    model, x, ep = _tiny_exported()
    via_fx = tome_fx.optimize(model, r=r, example_inputs=(x,))
    via_export = tome_fx.optimize(ep, r=r)
    assert via_fx.tome.frontend == "fx" and via_export.tome.frontend == "export"
    assert via_export.tome.r == via_fx.tome.r and via_export.tome.protected == 1
    # block 0's merge is followed by 3 blocks, each with 2 baked reshapes (qkv split, head merge)
    first = next(i for i, v in enumerate(via_export.tome.r) if v > 0)
    assert via_export.tome_counts["shape_repairs"] == 2 * (4 - 1 - first)
    with torch.no_grad():
        for batch in (1, 2, 3):
            xb = torch.randn(batch, 32, 16)
            assert (via_export(xb) - via_fx(xb)).abs().max() <= 1e-6


def test_repair_uses_runtime_sizes():
    """A repaired argument is a sym_size of the merged tensor, not a new literal."""
    model, x, ep = _tiny_exported(depth=2)
    fast = tome_fx.optimize(ep, r=3, drop_unread=False)  # both blocks merge
    repaired = [n for n in fast.graph.nodes if n.meta.get("tome", {}).get("role") == "shape_repair"]
    assert len(repaired) == fast.tome_counts["shape_repairs"] == 2
    for n in repaired:
        entry = n.args[1][n.meta["tome"]["entry"]]
        assert isinstance(entry, fx.Node) and entry.target is torch.ops.aten.sym_size.int


class _FoldTokens(nn.Module):
    """Pre-norm blocks whose MLP folds tokens into the batch (``reshape(B*N, C)``); with
    ``act`` an activation sits between the linear layer and the reshape back."""

    def __init__(self, dim=32, depth=3, act=True, fold=True):
        super().__init__()
        self.fold = fold
        self.act = nn.GELU() if act else nn.Identity()
        self.embed = nn.Linear(16, dim)
        self.attn = nn.ModuleList([SoftmaxAttention(dim, 4) for _ in range(depth)])
        self.mlp = nn.ModuleList([nn.Linear(dim, dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(self.norm(x))
            if self.fold:
                x = x + self.act(mlp(x.reshape(b * n, c))).reshape(b, n, c)
            else:
                x = x + self.act(mlp(x))
        return x.mean(dim=1)


def test_rows_folded_around_a_linear_layer_are_unfolded():
    """reshape(B*N, C) -> linear -> reshape(B, N, C) (what export makes of nn.MultiheadAttention's
    out-projection) becomes the linear layer on [B, N, C]: the merges go in and the result
    equals the same weights without the fold, captured by fx."""
    torch.manual_seed(0)
    model, x = _FoldTokens(act=False).eval(), torch.randn(2, 24, 16)
    fast = tome_fx.optimize(_export(model, x), r=3)
    assert fast.tome_counts["merges"] == 3 and not fast.tome.skipped
    assert any("3 linear layer(s) run on [tokens, batch, channels]" in n for n in fast.tome.notes)
    unfolded = _FoldTokens(act=False, fold=False).eval()
    unfolded.load_state_dict(model.state_dict())
    traced = tome_fx.optimize(unfolded, r=3, example_inputs=(x,))
    assert traced.tome.frontend != "export" and traced.tome_counts["merges"] == 3
    with torch.no_grad():
        torch.testing.assert_close(fast(x), traced(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(tome_fx.optimize(_export(model, x), r=0)(x), model(x))


def test_unprovable_shape_disables_merges():
    """reshape(B*N, C) folds the token count into another dim: no repair is guessed; the merges
    upstream are switched off with the reason, and the output is unchanged."""
    torch.manual_seed(0)
    model, x = _FoldTokens().eval(), torch.randn(2, 24, 16)
    fast = tome_fx.optimize(_export(model, x), r=3)
    assert fast.tome_counts["merges"] == 0
    reasons = [s.reason for s in fast.tome.skipped]
    assert len(reasons) == 3 and all("folds or splits the token dimension" in r for r in reasons)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_optimize_accepts_exported_program_inputs_and_explains():
    model, x, ep = _tiny_exported(depth=2)
    plan = tome_fx.explain(ep)  # example inputs come from the ExportedProgram
    assert plan.frontend == "export" and len(plan.blocks) == 2
    assert "captured with: torch.export" in str(plan)
    assert any("ExportedProgram" in n for n in plan.notes)
    fx_plan = tome_fx.explain(model, (x,))
    assert fx_plan.frontend == "fx" and "captured with: torch.fx" in str(fx_plan)


def test_export_fallback_error_is_one_line():
    from models import Untraceable

    with pytest.raises(tome_fx.CaptureError) as info:
        tome_fx.optimize(Untraceable(), r=2, example_inputs=(torch.randn(2, 8),))
    msg = str(info.value)
    assert msg.startswith("cannot trace Untraceable with torch.fx") and "\n" not in msg
    assert "torch.export failed on Untraceable" in msg


def test_budget_rewrite_captures_once(monkeypatch):
    """optimize(flops_budget=) builds the cost model and the final rewrite from one capture:
    ToMe and ToMato, through torch.export and through fx tracing."""
    capture_package = sys.modules["tome_fx.capture"]  # tome_fx.capture is also the function
    calls = []
    for name in ("trace", "capture_export"):
        real = getattr(capture_package, name)
        monkeypatch.setattr(capture_package, name,
                            lambda *a, real=real, name=name: calls.append(name) or real(*a))
    model, x, ep = _tiny_exported(depth=2)
    fast = tome_fx.optimize(ep, flops_budget=0.8)
    assert calls == ["capture_export"] and fast.tome.frontend == "export" and fast.tome.ratio <= 0.8
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3).eval()
    for method in ("tome", "tomato"):
        calls.clear()
        fast = tome_fx.optimize(vit, method=method, flops_budget=0.6,
                                example_inputs=(torch.randn(2, 3, 64, 64),))
        assert calls == ["trace"] and fast.tome.ratio <= 0.6 and fast.tome_counts["merges"] >= 1


def test_static_batch_export_is_noted():
    model, x, _ = _tiny_exported(depth=2)
    static = torch.export.export(model, (x,), strict=False)  # no dynamic batch dimension
    plan = tome_fx.explain(static)
    assert any("batch size static (2)" in n for n in plan.notes)


def test_batch_of_one_example_keeps_the_batch_dynamic():
    """Export specialises a size-1 dimension: a one-image example is exported as a batch of two,
    so the result takes every batch size (timm ``dynamic_img_size`` models take this path)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2,
                              dynamic_img_size=True).eval()
    x1 = torch.randn(1, 3, 64, 64)
    fast = tome_fx.optimize(model, r=3, example_inputs=(x1,))
    assert fast.tome.frontend == "export" and fast.tome_counts["merges"] >= 1
    assert not any("batch size static" in n for n in fast.tome.notes)
    xb = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        batched = fast(xb)
        alone = torch.cat([fast(xb[i:i + 1]) for i in range(4)])
        assert (batched - alone).abs().max() <= 1e-5  # each sample as if alone
        exact = tome_fx.optimize(model, r=0, example_inputs=(x1,))
        assert (exact(xb) - model(xb)).abs().max() <= 1e-5


def test_wrong_shape_is_a_one_line_shape_error():
    model, x, ep = _tiny_exported(depth=2)
    fast = tome_fx.optimize(ep, r=3)
    with pytest.raises(tome_fx.ShapeError) as info:
        fast(torch.randn(2, 30, 8))
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    assert "input 'x' has shape (2, 30, 8)" in msg and "(any, any, 16)" in msg
    assert "dimension 2 is fixed at 16" in msg and "optimize again" in msg
    with pytest.raises(tome_fx.ShapeError, match="captured for .* \\(3 dimensions\\)"):
        fast(torch.randn(2, 32))
    with torch.no_grad():
        assert fast(torch.randn(5, 32, 16)).shape == model(torch.randn(5, 32, 16)).shape
