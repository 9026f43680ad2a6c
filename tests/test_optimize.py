"""The core pass on timm models and hand-written transformers."""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import tome_fx
from cases import case, timm_model
from models import (CausalSelfAttention, Encoder, MHAEncoder, NoAttention, RegistersAfterClass,
                    RelPosBiasAttention, SoftmaxAttention, TinyTransformer, Untraceable)


# registry cases (tests/cases.py) this file runs the core checks on
ZOO = ["vit_small_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
       "deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2-224px",
       "vit_tiny_patch16_224-avgpool-no_cls", "explicit-softmax-64d-no_final_norm",
       "nn.TransformerEncoder-postnorm"]


def zoo(name):
    """(model, inputs at batch 2, protected tokens, whether the output pools over tokens)."""
    model, x, c = case(name)
    return model, x[0], c.prefix(model), c.pools(model)


class SizeRecorder(fx.Interpreter):
    """Collects the size tensors the merge nodes produce."""

    def __init__(self, gm):
        super().__init__(gm)
        self.sizes = []

    def run_node(self, n):
        out = super().run_node(n)
        if n.meta.get("tome", {}).get("role") == "size":
            self.sizes.append(out)
        return out


@pytest.mark.parametrize("name", ZOO)
def test_r0_is_exact(name):
    model, x, _, _ = zoo(name)
    fast = tome_fx.optimize(model, r=0, example_inputs=(x,))
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max().item() <= 1e-5
    assert fast.tome_counts["merges"] == 0


@pytest.mark.parametrize("name", ZOO)
def test_merging_is_sane(name):
    model, x, prefix, pools = zoo(name)
    fast = tome_fx.optimize(model, r=4, example_inputs=(x,))
    plan = fast.tome
    nblocks = len(plan.blocks)
    assert plan.protected == prefix
    assert plan.skipped == ()
    # In this zoo every model with protected tokens reads only those (a class-token head): the
    # last block computes only them after its attention and merges nothing (passes/drop.py).
    drops = int(prefix > 0)
    merges = nblocks - drops
    assert plan.r == [4] * merges + [0] * drops
    last = plan.blocks[-1]
    assert last.tokens_out == (prefix if drops else last.tokens_in - 4)
    assert last.dropped == (last.tokens_in - prefix if drops else 0)
    # every block after the first gets the proportional-attention bias
    assert fast.tome_counts == {"merges": merges, "size_bias": nblocks - 1,
                                "weighted_pool": int(pools), "mask_follow": 0, "drop_unread": drops,
                                "unmerge": 0}
    for a, b in zip(plan.blocks, plan.blocks[1:]):
        assert b.tokens_in == a.tokens_out == a.tokens_in - 4
    rec = SizeRecorder(fast)
    with torch.no_grad():
        y = rec.run(x)
    assert torch.isfinite(y).all()
    assert len(rec.sizes) == merges
    n0 = plan.blocks[0].tokens_in
    for s in rec.sizes:
        assert (s[:, :prefix] == 1).all()  # protected tokens never merge
        assert torch.allclose(s.sum(dim=1), torch.full((x.shape[0], 1), float(n0)))  # sizes conserve tokens


def test_registers_inserted_after_the_class_token_are_protected():
    """Parameter tokens form the protected prefix wherever they are concatenated, as long as they
    lead: class token, then registers cut in after it (HF DINOv2's layout)."""
    torch.manual_seed(0)
    model, x = RegistersAfterClass(registers=4).eval(), torch.randn(2, 16, 16)
    fast = tome_fx.optimize(model, r=0, example_inputs=(x,))
    assert fast.tome.protected == 5 and fast.tome.frontend == "fx"
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max().item() <= 1e-5
    rec = SizeRecorder(tome_fx.optimize(model, r=3, example_inputs=(x,)))
    with torch.no_grad():
        rec.run(x)
    assert rec.sizes and all((s[:, :5] == 1).all() for s in rec.sizes)  # registers never merge


def test_avg_pool_is_size_weighted():
    model, x, _, _ = zoo("vit_tiny_patch16_224-avgpool-no_cls")
    fast = tome_fx.optimize(model, r=8, example_inputs=(x,))
    assert fast.tome_counts["weighted_pool"] == 1
    # Independent check: the pooled features equal the size-weighted mean of the final tokens.
    feats = {}

    class Grab(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.meta.get("tome", {}).get("role") == "pool":
                feats["pooled"] = out
                feats["x"], feats["size"] = self.env[n.args[0]], self.env[n.args[1]]
            return out

    with torch.no_grad():
        Grab(fast).run(x)
    tokens, size = feats["x"], feats["size"]
    manual = (tokens * size).sum(1) / size.sum(1)
    assert torch.allclose(feats["pooled"], manual, atol=1e-6)
    assert not torch.allclose(feats["pooled"], tokens.mean(1), atol=1e-4)


def test_class_token_avg_pool_slices_sizes():
    """global_pool='avg' with a class token pools x[:, 1:]: the sizes must be sliced alike."""
    model = timm_model("vit_tiny_patch16_224", global_pool="avg")
    x = torch.randn(2, 3, 224, 224)
    fast = tome_fx.optimize(model, r=8, example_inputs=(x,))
    assert fast.tome_counts["weighted_pool"] == 1
    assert fast.tome.skipped == ()
    with torch.no_grad():
        assert torch.isfinite(fast(x)).all()


def test_prop_attn_off_has_no_bias():
    model, x, _, _ = zoo("deit_tiny_patch16_224")
    fast = tome_fx.optimize(model, r=4, example_inputs=(x,), prop_attn=False)
    assert fast.tome_counts["size_bias"] == 0
    on = tome_fx.optimize(model, r=4, example_inputs=(x,))
    with torch.no_grad():
        assert not torch.allclose(fast(x), on(x), atol=1e-5)


def test_model_not_mutated():
    model, x, _, _ = zoo("nn.TransformerEncoder-postnorm")
    before = copy.deepcopy(model.state_dict())
    classes = [type(m) for m in model.modules()]
    with torch.no_grad():
        y = model(x)
    tome_fx.optimize(model, r=4, example_inputs=(x,))
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training is None and isinstance(model.encoder, nn.TransformerEncoder)
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_training_gradients_flow():
    model = TinyTransformer().train()
    x = torch.randn(3, 33, 16)
    fast = tome_fx.optimize(model, r=4, example_inputs=(x,))
    fast.train()
    y = fast(x)
    y.sum().backward()
    grads = [p.grad for p in fast.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # merged tokens pass gradient to every input token, as average pooling would
    xg = x.clone().requires_grad_(True)
    fast(xg).sum().backward()
    assert (xg.grad.abs().sum(-1) > 0).all()


def test_timm_backward():
    model, x, _, _ = zoo("deit_tiny_patch16_224")
    fast = tome_fx.optimize(model, r=8, example_inputs=(x,))
    fast.train()
    fast(x[:1]).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
    assert fast.get_submodule("blocks.0.attn.qkv").weight.grad is not None


def test_position_read_is_refused():
    """A head reading token 5 by position would be silently wrong: merging is switched off."""
    model = TinyTransformer(read_token=5).eval()
    x = torch.randn(2, 33, 16)
    fast = tome_fx.optimize(model, r=4, example_inputs=(x,))
    assert fast.tome_counts["merges"] == 0
    assert len(fast.tome.skipped) == 4
    assert all("reads token 5 by position" in s.reason for s in fast.tome.skipped)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_causal_attention_is_refused():
    model = Encoder(lambda d: CausalSelfAttention(d, 4), depth=1).eval()
    x = torch.randn(2, 10, 16)
    plan = tome_fx.explain(model, example_inputs=(x,))
    assert plan.blocks == ()
    assert len(plan.skipped) == 1 and "causal" in plan.skipped[0].reason


def test_explain_lists_blocks():
    model, x, _, _ = zoo("deit_tiny_distilled_patch16_224")
    plan = tome_fx.explain(model, example_inputs=(x,))
    assert len(plan.blocks) == 12
    assert plan.blocks[0].site.startswith("blocks.0.attn")
    assert plan.protected == 2
    text = str(plan)
    assert "blocks.11.attn" in text and "protected prefix tokens: 2" in text


def test_default_inputs_from_timm_cfg():
    model, x, _, _ = zoo("deit_tiny_patch16_224")
    fast = tome_fx.optimize(model, r=2)
    assert fast.tome.blocks[0].tokens_in == 197


def test_r_forms():
    model, x, _, _ = zoo("explicit-softmax-64d-no_final_norm")
    assert tome_fx.optimize(model, r=[3, 2], example_inputs=(x,)).tome.r == [3, 2, 0, 0]
    assert tome_fx.optimize(model, r=(4, -1), example_inputs=(x,)).tome.r == [8, 5, 2, 0]
    # r larger than the limit is clamped to (N - protected) // 2 per block
    forms = dict(example_inputs=(x,), drop_unread=False)
    assert tome_fx.optimize(model, r=100, **forms).tome.r == [16, 8, 4, 2]
    # the last block of this class-token model computes only its class token after attention
    plan = tome_fx.optimize(model, r=100, example_inputs=(x,)).tome
    assert plan.r == [16, 8, 4, 0] and plan.blocks[-1].dropped == 34 - 16 - 8 - 4 - 1


@pytest.mark.parametrize("bad, exc, text", [
    (-1, ValueError, "r must be >= 0"),
    ("8", TypeError, "r must be an int"),
    (1.5, TypeError, "r must be an int"),
    (True, TypeError, "r must be an int"),
    ([2, -3], ValueError, "r[1] must be >= 0"),
    ((4, "x"), TypeError, "inflect must be a number"),
])
def test_bad_r(bad, exc, text):
    model, x, _, _ = zoo("explicit-softmax-64d-no_final_norm")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc) as info:
        tome_fx.optimize(model, r=bad, example_inputs=(x,))
    assert text in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_attention():
    with pytest.raises(ValueError, match="no attention found in NoAttention"):
        tome_fx.optimize(NoAttention(), r=2, example_inputs=(torch.randn(2, 8),))


def test_untraceable_names_class():
    with pytest.raises(tome_fx.CaptureError) as info:
        tome_fx.optimize(Untraceable(), r=2, example_inputs=(torch.randn(2, 8),))
    msg = str(info.value)
    assert msg.startswith("cannot trace Untraceable") and "\n" not in msg


def test_not_a_module():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        tome_fx.optimize(lambda x: x, r=2)


def test_missing_inputs_message():
    with pytest.raises(ValueError, match="pass example_inputs"):
        tome_fx.optimize(TinyTransformer(), r=2)


def test_r_or_budget_required():
    with pytest.raises(ValueError, match="pass r"):
        tome_fx.optimize(TinyTransformer(), example_inputs=(torch.randn(1, 33, 16),))


def test_relative_position_bias_is_refused():
    model = TinyTransformer(depth=2).eval()
    model.blocks[1].attn = RelPosBiasAttention(64, 4, 33)
    x = torch.randn(2, 32, 16)
    fast = tome_fx.optimize(model, r=4, example_inputs=(x,))
    reasons = [s.reason for s in fast.tome.skipped]
    assert any("relative position bias" in r for r in reasons)
    # block 0 would feed merged tokens into the refused block 1: it is switched off too
    assert fast.tome_counts["merges"] == 0
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_multihead_attention_called_directly():
    model = MHAEncoder(depth=2, norm_first=True, need_weights=True, in_dim=None, classes=None)
    model = model.eval()
    x = torch.randn(3, 21, 32)
    r0 = tome_fx.optimize(model, r=0, example_inputs=(x,))
    fast = tome_fx.optimize(model, r=3, example_inputs=(x,))
    assert fast.tome_counts == {"merges": 2, "size_bias": 1, "weighted_pool": 1, "mask_follow": 0,
                                "drop_unread": 0, "unmerge": 0}  # mean pooling reads every token
    assert [b.kind for b in fast.tome.blocks] == ["softmax", "softmax"]  # need_weights=True path
    with torch.no_grad():
        assert (r0(x) - model(x)).abs().max() <= 1e-5
        assert torch.isfinite(fast(x)).all()


class _ClassAttentionModel(torch.nn.Module):
    """Explicit-softmax blocks, then CaiT-style class attention: the class token's query attends
    to every token (keys, values), and only the class token goes on to the head."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.body = Encoder(lambda d: SoftmaxAttention(d, heads), dim=dim, depth=3,
                            final_norm=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.q, self.kv = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 2 * dim)
        self.proj, self.head, self.heads = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 5), heads

    def forward(self, x):
        x = self.body.embed(x)
        x = self.body.blocks(torch.cat([self.body.cls.expand(x.shape[0], -1, -1), x], dim=1))
        b, n, c = x.shape
        h = self.norm(x)
        q = self.q(h[:, :1]).reshape(b, 1, self.heads, -1).transpose(1, 2)
        k, v = self.kv(h).reshape(b, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, c)
        return self.head((x[:, :1] + self.proj(y))[:, 0])


def test_class_attention_reads_merged_tokens_as_keys():
    """Class attention (queries from the class token, keys from every token) is not a block to
    merge in, and says so; it is a consumer of merged tokens whose keys get log(size): with
    token pairs that are exact duplicates, merging every pair in block 0 changes nothing."""
    torch.manual_seed(0)
    model = _ClassAttentionModel().eval()
    x = torch.randn(2, 16, 16).repeat_interleave(2, dim=1)  # tokens 1,2 / 3,4 / ... equal
    fast = tome_fx.optimize(model, r=[16, 0, 0], example_inputs=(x,), drop_unread=False)
    plan = fast.tome
    assert plan.r == [16, 0, 0] and plan.protected == 1
    assert [s.reason for s in plan.skipped] == [tome_fx.match.CROSS_FROM_INPUT]
    assert fast.tome_counts["size_bias"] == 3  # blocks 1, 2 and the class attention
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max() <= 1e-5
        no_bias = tome_fx.optimize(model, r=[16, 0, 0], example_inputs=(x,), prop_attn=False,
                                   drop_unread=False)
        assert (no_bias(x) - model(x)).abs().max() > 1e-3  # the size term is what makes it exact
