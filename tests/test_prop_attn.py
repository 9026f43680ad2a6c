"""Proportional attention in its two forms: ``log(size)`` as SDPA's mask (``"bias"``) and folded
into one more query/key channel with no mask (``"fold"``, kernels.tokens.fold_size)."""
import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import tome_fx
from cases import case, timm_model
from reference_tome import reference_forward, reference_schedule
from tome_fx.kernels.tokens import fold_size


def _explicit(q, k, v, size, scale):
    """softmax(q k^T * scale + log s) v, written out."""
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    logits = logits + size[..., 0].double().log().reshape(size.shape[0], *[1] * (q.dim() - 3), 1,
                                                          size.shape[1])
    return logits.softmax(-1) @ v.double()


@pytest.mark.parametrize("shape", [(2, 3, 10, 16), (2, 10, 12), (1, 2, 7, 64)])
def test_fold_equals_the_size_bias_written_out(shape):
    torch.manual_seed(0)
    q, k, v = (torch.randn(*shape) for _ in range(3))
    size = torch.randint(1, 6, (shape[0], shape[-2], 1)).float()
    size[0, 2] = 0  # a ToMato padding token: nobody attends to it
    scale = 0.3
    q2, k2, v2 = fold_size(q, k, v, size, scale)
    assert q2.shape[-1] % 8 == 0 and q2.shape[-1] > shape[-1] and q2.shape == k2.shape == v2.shape
    got = F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :shape[-1]]
    want = _explicit(q, k, v, size, scale)
    assert (got.double() - want).abs().max() <= 1e-5


def _rewritten(model, x, form, **kw):
    return tome_fx.optimize(model, example_inputs=(x,), prop_attn=form, **kw)


@pytest.mark.parametrize("name,bf16", [("vit_tiny_patch16_224-d4-96px", True),
                                       ("vit_small_patch14_reg4_dinov2-d4-84px", False),
                                       ("vit_tiny_patch16_224-avgpool-no_cls-d4-96px", False)])
def test_fold_equals_bias_fp32_and_bf16(name, bf16):
    model, (x,), _ = case(name)
    bias, fold = _rewritten(model, x, "bias", r=6), _rewritten(model, x, "fold", r=6)
    folds = [n for n in fold.graph.nodes if n.meta.get("tome", {}).get("role") == "size_fold"]
    merged = fold.tome_counts["merges"]
    assert merged >= 2 and fold.tome_counts["size_bias"] == bias.tome_counts["size_bias"] > 0
    assert len(folds) == 5 * fold.tome_counts["size_bias"]  # fold, q, k, v, output slice
    assert not any(n.meta.get("tome", {}).get("role") == "bias" for n in fold.graph.nodes)
    assert any("folded into queries and keys" in n for n in fold.tome.notes)
    with torch.no_grad():
        assert (fold(x) - bias(x)).abs().max() <= 1e-5
        if not bf16:
            return
        # copies: both hold the cached case's own parameters (issue 38)
        bias, fold = (copy.deepcopy(m).to(torch.bfloat16) for m in (bias, fold))
        a, b = fold(x.bfloat16()).float(), bias(x.bfloat16()).float()
    assert F.cosine_similarity(a, b, dim=-1).min() >= 0.999


def test_fold_matches_independent_reference():
    """tome_fx with the folded form against the deliberately plain reference ToMe."""
    model = timm_model("vit_tiny_patch16_224", img_size=64, depth=4)
    x = torch.randn(2, 3, 64, 64)
    fast = _rewritten(model, x, "fold", r=5, drop_unread=False)
    with torch.no_grad():
        want = reference_forward(model, x, reference_schedule(5, 4))
        assert (fast(x) - want).abs().max() <= 1e-4


def test_fold_on_the_export_path_and_with_tomato_padding():
    """HF-style explicit ``scale=`` on an ATen graph; ToMato's size-0 padding gets -inf."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = T.ViTForImageClassification(T.ViTConfig(hidden_size=64, num_hidden_layers=3,
                                                 num_attention_heads=4, intermediate_size=128,
                                                 image_size=64, patch_size=8)).eval()
    x = torch.randn(2, 3, 64, 64)
    bias, fold = _rewritten(hf, x, "bias", r=4), _rewritten(hf, x, "fold", r=4)
    assert fold.tome.frontend == "export"
    with torch.no_grad():
        assert (fold(x).logits - bias(x).logits).abs().max() <= 1e-5
    model, (x,), _ = case("vit_tiny_patch16_224-avgpool-no_cls-d4-96px")
    x = x.clone()
    x[0] = x[0].mean()  # a flat image merges much more: the batch is padded with size-0 tokens
    kw = dict(method="tomato", sim_threshold=0.5, similarity="keys")
    bias, fold = _rewritten(model, x, "bias", **kw), _rewritten(model, x, "fold", **kw)
    with torch.no_grad():
        out = fold(x)
        assert torch.isfinite(out).all() and (out - bias(x)).abs().max() <= 1e-5


def test_fold_compiles_to_one_graph():
    torch._dynamo.reset()
    model, (x,), _ = case("vit_tiny_patch16_224-d4-96px")
    fold = _rewritten(model, x, "fold", r=6)
    with torch.no_grad():
        info = torch._dynamo.explain(fold)(x)
        assert info.graph_count == 1 and info.graph_break_count == 0, info.break_reasons
        compiled = torch.compile(fold, backend="aot_eager", fullgraph=True)
        assert (compiled(x) - fold(x)).abs().max() <= 1e-5
    torch._dynamo.reset()


def test_bad_prop_attn_is_one_line():
    model, (x,), _ = case("vit_tiny_patch16_224-d4-96px")
    with pytest.raises(ValueError, match="prop_attn must be True, False, 'bias' or 'fold'") as info:
        tome_fx.optimize(model, r=2, example_inputs=(x,), prop_attn="flash")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (kernel choice)")
def test_fold_runs_a_mask_free_fused_kernel_on_cuda():
    model = timm_model("vit_base_patch16_224", depth=2).cuda().to(torch.bfloat16)
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    fold = tome_fx.optimize(model, r=16, example_inputs=(x,), prop_attn="fold")
    with torch.no_grad(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fold(x)
    names = " ".join(e.name for e in prof.events()).lower()
    assert "flash" in names or "cudnn" in names or "fmha" in names, names[:2000]


def test_only_attention_over_merged_keys_gets_the_size_term():
    """An attention whose keys are another input (a text readout after the merged encoder)
    gets no log(size): the merges stay on, and the readout is the original's at r=0."""
    from models import TextReadout

    torch.manual_seed(0)
    model = TextReadout().eval()
    x, text = torch.randn(2, 16, 16), torch.randn(2, 5, 32)
    fast = tome_fx.optimize(model, r=2, example_inputs=(x, text))
    assert fast.tome.skipped == () and fast.tome_counts["merges"] >= 1
    assert fast.tome_counts["size_bias"] == len(fast.tome.blocks) - 1  # the encoder's, not the readout
    with torch.no_grad():
        same = tome_fx.optimize(model, r=0, example_inputs=(x, text))
        assert (same(x, text) - model(x, text)).abs().max() <= 1e-5
        assert torch.isfinite(fast(x, text)).all()
