"""HuggingFace transformers zoo, captured through torch.export (transformers v5 has no fx tracer).

Every model is built from a small config with random weights (nothing is downloaded). For each:
plain fx tracing fails and the export path is chosen; r=0 leaves every output unchanged at batch
1, 2 and 3; ``flops_budget=0.5`` is reached (FlopCounterMode on the rewritten module against the
original model); outputs are finite, per-sample (a sample's output does not depend on the rest
of its batch, which checks the dynamic batch dimension), and a backward pass gives finite
gradients. ViT and DeiT are also checked against the independent ToMe reference
(tests/reference_tome.py) through a timm twin carrying the same weights.
"""
from __future__ import annotations

import copy
import functools
from functools import partial

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import tome_fx
from flops import counted_flops
from tome_fx.capture.export import export_program
from mask_models import set_r, track
from reference_tome import reference_forward, reference_schedule

T = pytest.importorskip("transformers", reason="the HuggingFace zoo needs transformers (dev extra)")

SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
LAYERS = SMALL["num_hidden_layers"]


def _image(batch):
    return (torch.randn(batch, 3, 64, 64),)


# name -> (builder, inputs(batch), output field checked for r>0, protected prefix tokens)
ZOO = {
    "vit": (lambda: T.ViTForImageClassification(
        T.ViTConfig(**SMALL, image_size=64, patch_size=8, num_labels=10)), _image, "logits", 1),
    "deit_distilled": (lambda: T.DeiTForImageClassificationWithTeacher(
        T.DeiTConfig(**SMALL, image_size=64, patch_size=8, num_labels=10)), _image, "logits", 2),
    "clip_vision": (lambda: T.CLIPVisionModel(
        T.CLIPVisionConfig(**SMALL, image_size=64, patch_size=8)), _image, "pooler_output", 1),
    "videomae": (lambda: T.VideoMAEForVideoClassification(
        T.VideoMAEConfig(**SMALL, image_size=32, patch_size=8, num_frames=8, tubelet_size=2,
                         num_labels=5)),
        lambda b: (torch.randn(b, 8, 3, 32, 32),), "logits", 0),
    "ast_audio": (lambda: T.ASTForAudioClassification(
        T.ASTConfig(**SMALL, max_length=128, num_mel_bins=32, patch_size=8, frequency_stride=8,
                    time_stride=8, num_labels=5)),
        lambda b: (torch.randn(b, 128, 32),), "logits", 2),
}
NAMES = list(ZOO)
SLOW = {"videomae", "ast_audio"}  # the same path as vit/deit; run in CI with the slow marker
PARAMS = [pytest.param(n, id=n, marks=[pytest.mark.slow] if n in SLOW else []) for n in NAMES]


@functools.lru_cache(maxsize=None)
def _model(name):
    torch.manual_seed(0)
    if name == "vit_eager":  # explicit softmax attention instead of SDPA
        return T.ViTForImageClassification(T.ViTConfig(
            **SMALL, image_size=64, patch_size=8, num_labels=10, attn_implementation="eager")).eval()
    return ZOO[name][0]().eval()


def _inputs(name, batch):
    torch.manual_seed(100 + batch)
    return ZOO["vit" if name == "vit_eager" else name][1](batch)


@functools.lru_cache(maxsize=None)
def _budget(name):
    """optimize(flops_budget=0.5) on batch-2 example inputs (the automatic path choice)."""
    return tome_fx.optimize(_model(name), flops_budget=0.5, example_inputs=_inputs(name, 2))


def _tensors(out):
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_fx_cannot_trace_so_export_is_used(name):
    with pytest.raises(Exception):
        fx.symbolic_trace(copy.deepcopy(_model(name)))


@pytest.mark.parametrize("name", PARAMS)
def test_r0_unchanged(name):
    model = _model(name)
    fast = tome_fx.optimize(model, r=0, example_inputs=_inputs(name, 2))
    assert fast.tome.frontend == "export"
    assert fast.tome.protected == ZOO[name][3]
    assert len(fast.tome.blocks) == LAYERS and not fast.tome.skipped
    assert fast.tome_counts == {"merges": 0, "size_bias": 0, "weighted_pool": 0, "shape_repairs": 0,
                                "mask_follow": 0, "drop_unread": 0,
                                "unmerge": 0}
    with torch.no_grad():
        for batch in (1, 2, 3):
            x = _inputs(name, batch)
            ref, out = model(*x), fast(*x)
            assert type(out) is type(ref)  # the same ModelOutput class
            ref, out = _tensors(ref), _tensors(out)
            assert ref.keys() == out.keys()
            for key in ref:
                assert (out[key] - ref[key]).abs().max() <= 1e-5, (batch, key)


@pytest.mark.parametrize("name", PARAMS)
def test_flops_budget_half(name):
    model, fast = _model(name), _budget(name)
    x = _inputs(name, 2)
    counted, original = counted_flops(fast, *x), counted_flops(model, *x)
    ratio = counted / original
    assert 0.49 <= ratio <= 0.5, (fast.tome.r, ratio)
    assert fast.tome.flops == counted  # the cost model's prediction is exact on ATen graphs too
    assert fast.tome.frontend == "export"
    merged = [i for i, r in enumerate(fast.tome.r) if r > 0]
    counts = fast.tome_counts
    assert counts["merges"] == len(merged) and counts["size_bias"] == len(
        [i for i in range(LAYERS) if i > merged[0]])
    # each attention after the first merge has 5 baked token counts: q/k/v views, 2 reshapes
    assert counts["shape_repairs"] == 5 * (LAYERS - 1 - merged[0])
    assert counts["weighted_pool"] == (1 if name == "videomae" else 0)  # mean pooling head


@pytest.mark.parametrize("name", PARAMS)
def test_batches_1_and_3_finite_and_per_sample(name):
    fast, key = _budget(name), ZOO[name][2]
    x3 = _inputs(name, 3)
    with torch.no_grad():
        out3 = fast(*x3)[key]
        assert out3.shape[0] == 3 and torch.isfinite(out3).all()
        for i in range(3):
            one = fast(*(t[i : i + 1] for t in x3))[key]
            assert one.shape[0] == 1 and torch.isfinite(one).all()
            assert (one[0] - out3[i]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", PARAMS)
def test_backward(name):
    fast, key = _budget(name), ZOO[name][2]
    for batch in (1, 3):
        fast.zero_grad(set_to_none=True)
        fast(*_inputs(name, batch))[key].square().sum().backward()
        grads = {n: p.grad for n, p in fast.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        first_qkv = [g for n, g in grads.items() if ".0." in n and ("q_proj" in n or "query" in n)]
        assert first_qkv and all(g.abs().sum() > 0 for g in first_qkv)
    # the result computes with the user's model's own parameters, as torch.compile (issue 38)
    assert {id(p) for p in fast.parameters()} <= {id(p) for p in _model(name).parameters()}
    fast.zero_grad(set_to_none=True)  # no gradients left on the cached model


# ------------------------------------------------------------------------------------------
# independent reference: HF ViT / DeiT weights in a timm twin, run by tests/reference_tome.py
# ------------------------------------------------------------------------------------------

def _timm_twin(hf) -> nn.Module:
    """A timm VisionTransformer(Distilled) with the HF model's weights (same function at r=0)."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    distilled = hasattr(hf, "distillation_classifier")
    base, cfg = (hf.deit if distilled else hf.vit), hf.config
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    twin = cls(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.hidden_size,
               depth=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
               mlp_ratio=cfg.intermediate_size / cfg.hidden_size, qkv_bias=cfg.qkv_bias,
               num_classes=cfg.num_labels, norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps))
    emb = base.embeddings
    sd = {"cls_token": emb.cls_token, "pos_embed": emb.position_embeddings,
          "patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
          "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
          "norm.weight": base.layernorm.weight, "norm.bias": base.layernorm.bias}
    if distilled:
        sd.update({"dist_token": emb.distillation_token,
                   "head.weight": hf.cls_classifier.weight, "head.bias": hf.cls_classifier.bias,
                   "head_dist.weight": hf.distillation_classifier.weight,
                   "head_dist.bias": hf.distillation_classifier.bias})
    else:
        sd.update({"head.weight": hf.classifier.weight, "head.bias": hf.classifier.bias})
    for i, layer in enumerate(base.layers):
        a, p = layer.attention, f"blocks.{i}."
        sd.update({
            p + "norm1.weight": layer.layernorm_before.weight, p + "norm1.bias": layer.layernorm_before.bias,
            p + "attn.qkv.weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
            p + "attn.qkv.bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
            p + "attn.proj.weight": a.o_proj.weight, p + "attn.proj.bias": a.o_proj.bias,
            p + "norm2.weight": layer.layernorm_after.weight, p + "norm2.bias": layer.layernorm_after.bias,
            p + "mlp.fc1.weight": layer.mlp.fc1.weight, p + "mlp.fc1.bias": layer.mlp.fc1.bias,
            p + "mlp.fc2.weight": layer.mlp.fc2.weight, p + "mlp.fc2.bias": layer.mlp.fc2.bias,
        })
    twin.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return twin.eval()


@functools.lru_cache(maxsize=None)
def _exported(name):
    """One export per model for the reference cases; optimize(ExportedProgram) reuses it."""
    return export_program(_model(name), _inputs(name, 2), {})


@pytest.mark.parametrize("name,r", [
    pytest.param("vit", 4, id="vit-r4"),
    pytest.param("vit", (6, -1), id="vit-r6_inflect-1"),
    pytest.param("vit_eager", 4, id="vit_eager-r4"),
    pytest.param("deit_distilled", 4, id="deit_distilled-r4", marks=pytest.mark.slow),
    pytest.param("deit_distilled", (6, -1), id="deit_distilled-r6_inflect-1",
                 marks=pytest.mark.slow),
])
def test_matches_independent_reference(name, r):
    model, x = _model(name), _inputs(name, 2)[0]
    twin = _timm_twin(model)
    with torch.no_grad():
        unmerged = model(x).logits
        assert (reference_forward(twin, x, [0] * LAYERS) - unmerged).abs().max() <= 1e-5
        expected = reference_forward(twin, x, reference_schedule(r, LAYERS))
        assert (expected - unmerged).abs().max() > 1e-3  # merging moves the output: not vacuous
        fast = tome_fx.optimize(_exported(name), r=r)
        got = fast(x).logits
    # the classifier reads the class token(s) only: the last block computes only those after its
    # attention instead of merging (drop.py); the logits still equal the merging reference's
    assert fast.tome.r == reference_schedule(r, LAYERS)[:-1] + [0]
    assert fast.tome_counts["drop_unread"] == 1
    assert {b.kind for b in fast.tome.blocks} == {"softmax" if name == "vit_eager" else "sdpa"}
    assert (got - expected).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------
# BERT: blocks found through export (padding masks and the pooler's token 0 are issue 4's
# mask/protected-token work); here: capture, matching and r=0 exactness
# ------------------------------------------------------------------------------------------

def _bert(kind):
    torch.manual_seed(0)
    cfg = T.BertConfig(**SMALL, vocab_size=100, num_labels=3)
    return (T.BertModel if kind == "model" else T.BertForSequenceClassification)(cfg).eval()


@pytest.mark.parametrize("kind", ["model", "sequence_classification"])
def test_bert_captured_by_export_and_blocks_found(kind):
    model = _bert(kind)
    ids = {"input_ids": torch.randint(0, 100, (2, 24))}
    fast = tome_fx.optimize(model, r=0, example_inputs=ids)
    plan = fast.tome
    assert plan.frontend == "export"
    assert [(b.kind, b.norm, b.tokens_in) for b in plan.blocks] == [("sdpa", "post", 24)] * LAYERS
    assert "captured with: torch.export" in str(plan)
    with torch.no_grad():
        for batch in (1, 3):
            x = {"input_ids": torch.randint(0, 100, (batch, 24))}
            ref, out = _tensors(model(**x)), _tensors(fast(**x))
            assert all((out[k] - ref[k]).abs().max() <= 1e-5 for k in ref)


def test_default_inputs_for_video_and_audio_configs():
    from tome_fx.capture import default_inputs

    assert default_inputs(_model("videomae"))[0].shape == (2, 8, 3, 32, 32)  # [B, T, C, H, W]
    assert default_inputs(_model("ast_audio"))[0].shape == (2, 128, 32)  # [B, time, mel bins]
    assert default_inputs(_model("vit"), batch=3)[0].shape == (3, 3, 64, 64)


def test_masked_bert_padding_follows_merges():
    """HF BERT with a padding mask, over the export path: the pooler's token 0 is protected,
    padding never merges into real tokens (tracked independently of tome_fx's bookkeeping),
    the mask follows the merges, and r=0 leaves the logits unchanged."""
    model = _bert("sequence_classification")
    ids = torch.randint(0, 100, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 18:] = 0
    x = {"input_ids": ids, "attention_mask": mask}
    fast = tome_fx.optimize(model, r=4, example_inputs=x)
    assert fast.tome.frontend == "export" and fast.tome.protected == 1 and not fast.tome.skipped
    assert fast.tome_counts["merges"] == LAYERS and fast.tome_counts["mask_follow"] > 0
    t, out = track(fast, ids, mask)
    assert torch.isfinite(out.logits).all()
    real = mask.bool()
    n_prev = ids.shape[1]
    for size, member in t.merges:
        assert member.shape[1] < n_prev
        n_prev = member.shape[1]
        assert member[:, 0, 0].all() and (member[:, 0].sum(-1) == 1).all()  # token 0 alone, first
        mixed = (member & real[:, None, :]).any(-1) & (member & ~real[:, None, :]).any(-1)
        assert not mixed.any(), "a merged token mixes padding and real tokens"
        assert torch.equal(member.sum(-1, keepdim=True).float(), size)
    # tome_fx.track_sources (the merges' own matching, rerun) agrees with the independent tracker
    tracked = tome_fx.track_sources(fast, **x)
    assert torch.equal(tracked.output.logits, out.logits)
    assert len(tracked.sources) == len(t.merges)
    for (size, member), block in zip(t.merges, sorted(tracked.sources)):
        assert torch.equal(tracked.sources[block] > 0, member)
    set_r(fast, 0)
    with torch.no_grad():
        assert (fast(**x).logits - model(**x).logits).abs().max() <= 1e-5


def test_batch_of_one_example_runs_every_batch():
    """One example image (the most common thing users pass): the export path keeps the batch
    dynamic, so the result runs a batch of 4, each sample as if alone."""
    model = _model("vit")
    fast = tome_fx.optimize(model, flops_budget=0.5, example_inputs=_inputs("vit", 1))
    assert fast.tome.frontend == "export" and fast.tome.ratio <= 0.5
    x = _inputs("vit", 4)
    with torch.no_grad():
        batched = fast(*x).logits
        alone = torch.cat([fast(x[0][i:i + 1]).logits for i in range(4)])
    assert batched.shape == (4, 10) and (batched - alone).abs().max() <= 1e-5


def test_other_sequence_lengths_run_and_beyond_the_position_table_is_a_shape_error():
    """The sequence length is captured dynamic: 48 tokens run (r=2 per block, as at 32); more
    tokens than the position table holds (512) is the one-line ShapeError naming the range."""
    model = _bert("model")
    ids = torch.randint(0, 100, (2, 32))
    fast = tome_fx.optimize(model, r=2, example_inputs={"input_ids": ids,
                                                         "attention_mask": torch.ones_like(ids)})
    longer = torch.randint(0, 100, (2, 48))
    with torch.no_grad():
        out = fast(input_ids=longer, attention_mask=torch.ones_like(longer)).last_hidden_state
    assert out.shape == (2, 48, SMALL["hidden_size"])  # unmerged to one row per token
    too_long = torch.randint(0, 100, (2, 600))
    with pytest.raises(tome_fx.ShapeError) as info:
        fast(input_ids=too_long, attention_mask=torch.ones_like(too_long))
    msg = str(info.value)
    assert "\n" not in msg and "input_ids has 600 tokens; the model's position table holds 512" in msg
    assert "(embeddings.position_embeddings.weight: 512 rows; max_position_embeddings=512)" in msg


def test_tomato_finds_the_patch_grid_on_export_graphs():
    """HF ViT's patch embedding is an ATen convolution on the export path; ToMato finds its
    8x8 grid, repairs the baked token counts and meets the budget."""
    model = _model("vit")
    x = _inputs("vit", 2)
    fast = tome_fx.optimize(model, method="tomato", flops_budget=0.7, example_inputs=x)
    plan = fast.tome
    assert plan.grid == (8, 8) and plan.frontend == "export" and plan.ratio <= 0.7
    assert "captured with: torch.export" in str(plan)
    assert fast.tome_counts["merges"] == 1 and fast.tome_counts["shape_repairs"] > 0
    assert plan.flops == counted_flops(fast, *x) and plan.flops_original == counted_flops(model, *x)
    with torch.no_grad():
        out = fast(*x).logits
        alone = torch.cat([fast(x[0][i:i + 1]).logits for i in range(2)])
    assert (out - alone).abs().max() <= 1e-5
    tracked = tome_fx.track_sources(fast, *x)
    assert tracked.sources[0].shape == (2, plan.blocks[0].tokens_out, 65)
    inf = tome_fx.optimize(model, method="tomato", sim_threshold=float("inf"), example_inputs=x)
    with torch.no_grad():
        assert (inf(*x).logits - model(*x).logits).abs().max() <= 1e-5


def test_dinov2_registers_are_protected_like_timm():
    """HF inserts the registers after the class token once position embeddings are added; they
    are protected with it (1 + num_register_tokens), as timm's ``num_prefix_tokens``."""
    from cases import case

    model, x, _ = case("hf-dinov2-registers")
    fast = tome_fx.optimize(model, r=0, example_inputs=x)
    assert fast.tome.protected == 1 + model.config.num_register_tokens == 5
    with torch.no_grad():
        ref, out = model(*x), fast(*x)
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max() <= 1e-5
    assert (out.pooler_output - ref.pooler_output).abs().max() <= 1e-5


def test_unmet_budget_warns_and_returns_the_model_unchanged():
    """Every attention of this Data2Vec has a learned relative position bias: no block can
    merge, so flops_budget=0.5 cannot be met; optimize says so and returns the model as is."""
    torch.manual_seed(0)
    model = T.Data2VecVisionModel(T.Data2VecVisionConfig(
        **SMALL, image_size=64, patch_size=8, use_relative_position_bias=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_()  # a trained table (constructed ones are zeros)
    x = _inputs("vit", 2)
    with pytest.warns(UserWarning, match="flops_budget=0.5 is not met") as record:
        fast = tome_fx.optimize(model, flops_budget=0.5, example_inputs=x)
    msg = str(next(w.message for w in record if "not met" in str(w.message)))
    assert "\n" not in msg and "relative position bias" in msg
    assert fast.tome_counts["merges"] == 0 and fast.tome.ratio == 1.0
    with torch.no_grad():
        assert (fast(*x).last_hidden_state - model(*x).last_hidden_state).abs().max() <= 1e-5


def _data2vec(tables: str):
    torch.manual_seed(0)
    model = T.Data2VecVisionModel(T.Data2VecVisionConfig(
        **SMALL, image_size=64, patch_size=8, use_relative_position_bias=True)).eval()
    if tables == "random":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "relative_position_bias_table" in name:
                    p.normal_()
    return model


@pytest.mark.parametrize("tables", ["zero", "random"])
def test_relative_position_tables_are_refused_whatever_their_values(tables):
    """A relative-position table is a term indexed by token position even while it holds
    zeros (as constructed, before fine-tuning): it is never dropped as "masking nothing", so
    the attention is refused and the tables stay connected (they get gradients)."""
    model = _data2vec(tables)
    x = _inputs("vit", 2)
    fast = tome_fx.optimize(model, r=4, example_inputs=x)
    assert fast.tome_counts["merges"] == 0 and len(fast.tome.skipped) == LAYERS
    assert all("indexed by token position" in s.reason for s in fast.tome.skipped)
    assert not any("mask nothing" in n for n in fast.tome.notes)
    with torch.no_grad():
        assert (fast(*x).last_hidden_state - model(*x).last_hidden_state).abs().max() <= 1e-5
    fast.train()
    fast(*x).last_hidden_state.square().mean().backward()
    tables_grads = [p.grad for n, p in fast.named_parameters() if "relative_position_bias_table" in n]
    assert len(tables_grads) == LAYERS and all(g is not None for g in tables_grads)


def test_decoder_is_captured_and_refused_as_causal():
    """GPT-2 returns a key/value cache (no tensor) unless told not to: it is captured with
    use_cache=False and refused for its causal mask, with the reason; the output is unchanged."""
    torch.manual_seed(0)
    model = T.GPT2Model(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    ids = {"input_ids": torch.randint(0, 100, (2, 16))}
    fast = tome_fx.optimize(model, r=2, example_inputs=ids)
    assert fast.tome_counts["merges"] == 0 and len(fast.tome.skipped) == 2
    assert all("fixed pattern" in s.reason for s in fast.tome.skipped)
    assert any("use_cache=False" in n for n in fast.tome.notes)
    with torch.no_grad():
        want = model(**ids, use_cache=False).last_hidden_state
        assert (fast(**ids).last_hidden_state - want).abs().max() <= 1e-5
