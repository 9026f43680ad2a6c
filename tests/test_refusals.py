"""Registers in front of an attention-pool (MAP) head merge as registers without one do, and
refusals name their real cause (rotary tables are not "capped", windows, relative position
bias). A refused model computes what the original does."""
import copy

import pytest
import torch

import tome_fx
from tome_fx import graph as gu
from tome_fx.track import track_sources
from cases import timm_model

TINY = dict(img_size=64, embed_dim=64, depth=4, num_heads=4, num_classes=10)
REGISTER_MAPS = {
    # timm's SO150M with 4 registers and a MAP head; no class token; pos embed over registers too
    "so150m_reg4_map": lambda: timm_model("vit_so150m_patch16_reg4_map_256", **TINY),
    "siglip_map_reg4": lambda: timm_model("vit_base_patch16_siglip_224", reg_tokens=4, **TINY),
    # registers concatenated after the position embedding (no_embed_class)
    "vit_reg4_map_no_embed_class": lambda: timm_model(
        "vit_base_patch16_224", reg_tokens=4, global_pool="map", class_token=False,
        no_embed_class=True, **TINY),
}


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", [n if n == "so150m_reg4_map" else
                                  pytest.param(n, marks=pytest.mark.slow)  # slow twins
                                  for n in REGISTER_MAPS])
def test_registers_with_attention_pool_merge_in_every_block(name):
    model, x = REGISTER_MAPS[name](), torch.randn(2, 3, 64, 64)
    before = copy.deepcopy(model.state_dict())
    exact = tome_fx.optimize(model, r=0, example_inputs=(x,))
    fast = tome_fx.optimize(model, r=8, example_inputs=(x,))
    plan = fast.tome
    assert plan.protected == 4 and plan.skipped == ()
    assert all(b.r > 0 for b in plan.blocks), plan
    assert any("attention pooling" in n and "its keys get log(size)" in n for n in plan.notes)
    with torch.no_grad():
        ref = model(x)
        assert _max_diff(exact(x), ref) <= 1e-6
        tracked = track_sources(fast, x)
    assert torch.equal(tracked.output, fast(x)) and torch.isfinite(tracked.output).all()
    last = tracked.at(len(plan.blocks) - 1)  # [B, N, 20]: which input tokens each token holds
    assert torch.equal(last[:, :4], torch.eye(20)[:4].expand(2, -1, -1))  # registers untouched
    # the pool's keys are the tokens past the registers, with log(their sizes) as its bias
    pool = next(n for n in fast.graph.nodes
                if n.meta.get("tome", {}).get("role") == "cross_attention")
    bias = gu.arg(pool, 3, "attn_mask")
    got = gu.record_values(fast, [x], [bias])[bias]
    sizes = last[:, 4:].sum(-1)
    assert torch.allclose(got.reshape(2, -1), sizes.log(), atol=1e-6) and sizes.sum() == 2 * 16
    for k, v in model.state_dict().items():  # the user's model is not touched
        assert torch.equal(v, before[k])


def test_a_failure_at_r0_is_not_blamed_on_a_table(monkeypatch):
    """With the pool's bias over every token (what size_bias did), the run fails before
    anything merges: the reason says so and does not call the pool's learned query (input-
    independent, but no position table) a "fixed table"."""
    from tome_fx.passes import size_bias

    monkeypatch.setattr(size_bias, "_keys_size", lambda ctx, site, core: site.size)
    model, x = REGISTER_MAPS["so150m_reg4_map"](), torch.randn(2, 3, 64, 64)
    plan = tome_fx.optimize(model, r=8, example_inputs=(x,)).tome
    assert plan.r == [0, 0, 0, 0] and len(plan.skipped) == 4
    for s in plan.skipped:
        assert "fails with every merge at r=0: The size of tensor a (16) must match" in s.reason
        assert "fixed" not in s.reason


def test_blocks_refused_for_rotary_tables_are_not_called_capped():
    """``--r 8`` on EVA-02: blocks 0 and 1 are refused for their rotary tables, block 2 merges
    all 8; the report's r line says nothing is capped."""
    from argparse import Namespace

    from tome_fx.cli.commands import _r_applied

    model = timm_model("eva02_tiny_patch14_224", depth=3, img_size=56)
    plan = tome_fx.optimize(model, r=8, example_inputs=(torch.randn(2, 3, 56, 56),)).tome
    assert plan.r == [0, 0, 8] and len(plan.skipped) == 2
    assert all("rotary or position embedding" in s.reason for s in plan.skipped)
    assert _r_applied(Namespace(r="8", r_value=8), plan) == "r per block [0, 0, 8]"
    # a block that merges less than asked for its token count still says so
    assert "--r 9 capped in block(s) 2: a block merges at most half" in _r_applied(
        Namespace(r="9", r_value=9), plan)


def _refused_exactly(model, inputs: dict, r=4):
    """The plan of a model whose every attention is refused; its output is the original's."""
    fast = tome_fx.optimize(model, r=r, example_inputs=inputs)
    assert fast.tome.r == [] or set(fast.tome.r) == {0}
    with torch.no_grad():
        a, b = model(**inputs), fast(**inputs)
    a = a if isinstance(a, torch.Tensor) else a[0]
    b = b if isinstance(b, torch.Tensor) else b[0]
    assert _max_diff(a, b) == 0
    return [s.reason for s in fast.tome.skipped]


def test_sam_windows_are_named():
    """SAM: windowed blocks partition the [B, H, W, C] grid into windows inside the block; its
    global blocks keep the tokens a grid between blocks. Neither is "no MLP residual branch"."""
    model = timm_model("samvit_base_patch16", img_size=64, embed_dim=64, depth=2, num_heads=4,
                       window_size=2, global_attn_indexes=(1,), neck_chans=32, num_classes=0)
    reasons = _refused_exactly(model, {"x": torch.randn(2, 3, 64, 64)})
    assert len(reasons) == 2 and not any("no MLP residual" in r for r in reasons)
    assert reasons[0].startswith("windowed attention: the block regroups the tokens of the "
                                 "residual stream [2, 4, 4, 64] into windows of 4 ")
    assert "not 3-D" in reasons[1] and "the tokens stay a grid" in reasons[1]


def test_hf_sam_vision_windows_are_named():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SamVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=64, patch_size=8, window_size=4,
                                       global_attn_indexes=[1], output_channels=32, mlp_dim=128)
    model = transformers.SamVisionModel(cfg).eval()
    reasons = _refused_exactly(model, {"pixel_values": torch.randn(2, 3, 64, 64)})
    assert "windowed attention" in reasons[0] and "windows of 16" in reasons[0]
    assert "the tokens stay a grid" in reasons[1]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_t5_relative_position_bias_is_named(impl):
    """T5 adds one relative-position-bias table (built from positions, shared by every layer)
    to the logits, with the padding mask folded in: refused for the table, not the MLP."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                num_heads=4)
    cfg._attn_implementation = impl
    model = transformers.T5EncoderModel(cfg).eval()
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    reasons = _refused_exactly(model, {"input_ids": torch.randint(0, 100, (2, 16)),
                                       "attention_mask": mask})
    assert len(reasons) == 2
    for r in reasons:
        assert "embedding" in r and "does not depend on the input" in r, r
        assert "indexed by token position (relative position bias" in r
