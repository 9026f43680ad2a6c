"""CLIP and SigLIP called as their processors call them: input_ids, pixel_values and the
tokenizer's attention_mask (row 1 padded). Each tower is its own token stream: the vision tower
merges, the text tower is refused with its real cause (CLIP: causal attention and an
end-of-sequence pooler; SigLIP: a pooler reading the last token), and the refused tower's outputs
stay exactly the original's. Random tiny configs."""
import functools

import pytest
import torch
import transformers as T

import tome_fx
from tome_fx import graph as gu
from mask_models import MiniBert, bert_inputs

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, vocab_size=100, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              image_size=64, patch_size=8)
VISION_BLOCKS = VISION["num_hidden_layers"]


@functools.lru_cache(maxsize=None)
def _model(name, **vision):
    torch.manual_seed(0)
    text_cfg, vision_cfg = dict(TEXT), dict(VISION, **vision)
    if name.startswith("Siglip"):
        return T.SiglipModel(T.SiglipConfig(text_config=text_cfg, vision_config=vision_cfg)).eval()
    if name == "CLIPModel":
        return T.CLIPModel(T.CLIPConfig(text_config=text_cfg, vision_config=vision_cfg,
                                        projection_dim=32)).eval()
    if "Text" in name:
        return getattr(T, name)(T.CLIPTextConfig(**text_cfg, projection_dim=32)).eval()
    return getattr(T, name)(T.CLIPVisionConfig(**vision_cfg, projection_dim=32)).eval()


def _inputs(text=True, image=True, image_size=64):
    g = torch.Generator().manual_seed(1)
    out = {}
    if text:
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 10:] = 0  # what the tokenizer returns for a shorter second sentence
        out.update(input_ids=torch.randint(1, 99, (2, 16), generator=g), attention_mask=mask)
    if image:
        out["pixel_values"] = torch.randn(2, 3, image_size, image_size, generator=g)
    return out


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _tensors(out) -> dict:
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _exact_at_r0(fast, model, inputs):
    """Every tensor output of the rewritten graph with its merges at r=0 is the original's."""
    with torch.no_grad():
        ref = _tensors(model(**inputs))
        with gu.merges_at(fast, 0):
            got = _tensors(fast(**inputs))
    assert got.keys() == ref.keys()
    for k in ref:
        assert _rel(got[k], ref[k]) <= 1e-5, k


def _rows(plan, tower):
    return [b for b in plan.blocks if b.site.startswith(tower)]


def _skipped(plan, tower):
    return [s.reason for s in plan.skipped if s.site.startswith(tower)]


def test_clip_with_mask_merges_vision_and_refuses_causal_text():
    model, inputs = _model("CLIPModel"), _inputs()
    fast = tome_fx.optimize(model, r=8, example_inputs=inputs)
    plan = fast.tome
    assert [b.r for b in _rows(plan, "vision_model")] == [8] * VISION_BLOCKS
    assert all(b.r == 0 for b in _rows(plan, "text_model"))
    reasons = _skipped(plan, "text_model")
    assert len(reasons) == TEXT["num_hidden_layers"]
    assert all("causal attention" in r for r in reasons)
    assert not _skipped(plan, "vision_model")
    with torch.no_grad():
        ref, out = model(**inputs), fast(**inputs)
    assert _rel(out.text_embeds, ref.text_embeds) <= 1e-5  # the refused tower is untouched
    assert _rel(out.image_embeds, ref.image_embeds) > 1e-4  # the vision tower did merge
    _exact_at_r0(fast, model, inputs)


def test_clip_with_mask_holds_the_budget():
    model, inputs = _model("CLIPModel"), _inputs()
    fast = tome_fx.optimize(model, flops_budget=0.6, example_inputs=inputs)
    plan = fast.tome
    assert 0.59 <= plan.ratio <= 0.6  # over the whole model, the unmerged text tower included
    assert all(b.r > 0 for b in _rows(plan, "vision_model"))
    assert all("causal attention" in r for r in _skipped(plan, "text_model"))
    with torch.no_grad():
        assert _rel(fast(**inputs).text_embeds, model(**inputs).text_embeds) <= 1e-5


@pytest.mark.parametrize("name", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def test_clip_vision_tower_alone(name):
    model, inputs = _model(name), _inputs(text=False)
    fast = tome_fx.optimize(model, r=8, example_inputs=inputs)
    assert [b.r for b in fast.tome.blocks] == [8] * VISION_BLOCKS and not fast.tome.skipped
    _exact_at_r0(fast, model, inputs)


@pytest.mark.parametrize("name", ["CLIPTextModel", "CLIPTextModelWithProjection"])
def test_clip_text_tower_alone_is_refused_as_causal(name):
    model, inputs = _model(name), _inputs(image=False)
    fast = tome_fx.optimize(model, r=4, example_inputs=inputs)
    assert fast.tome_counts["merges"] == 0
    assert len(fast.tome.skipped) == TEXT["num_hidden_layers"]
    assert all("causal attention" in s.reason for s in fast.tome.skipped)
    with torch.no_grad():
        got, ref = _tensors(fast(**inputs)), _tensors(model(**inputs))
    assert all(torch.equal(got[k], ref[k]) for k in ref)


class EosPooled(MiniBert):
    """CLIP's text pooler on a bidirectional encoder: the hidden state at the argmax of the ids
    (the end-of-sequence token, the highest id)."""

    def forward(self, input_ids, attention_mask):
        n = input_ids.shape[1]
        x = self.norm(self.tok(input_ids) + self.pos(torch.arange(n)))
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        return x[torch.arange(x.shape[0]), input_ids.argmax(-1)]


def test_end_of_sequence_pooler_is_refused_with_its_reason():
    model = EosPooled().eval()
    ids, mask = bert_inputs()
    fast = tome_fx.optimize(model, r=4, example_inputs=(ids, mask))
    assert fast.tome_counts["merges"] == 0
    reasons = [s.reason for s in fast.tome.skipped]
    assert len(reasons) == 3
    assert all("argmax of input_ids (a pooler reading the end-of-sequence token)" in r
               for r in reasons)
    with torch.no_grad():
        assert torch.equal(fast(ids, mask), model(ids, mask))


def test_siglip_with_mask_merges_vision_and_refuses_the_last_token_pooler():
    model, inputs = _model("SiglipModel"), _inputs()
    fast = tome_fx.optimize(model, r=8, example_inputs=inputs)
    plan = fast.tome
    assert [b.r for b in _rows(plan, "vision_model")] == [8] * VISION_BLOCKS
    reasons = _skipped(plan, "text_model")
    assert len(reasons) == TEXT["num_hidden_layers"]
    assert all("reads token -1 by position, the last one" in r for r in reasons)
    assert any("attention pooling" in n for n in plan.notes)  # the MAP head reads sizes
    with torch.no_grad():
        ref, out = model(**inputs), fast(**inputs)
    assert _rel(out.text_embeds, ref.text_embeds) <= 1e-5
    _exact_at_r0(fast, model, inputs)


def test_towers_of_equal_token_count_keep_their_own_padding():
    """SigLIP's vision tower at 16 patches sees as many tokens as the 16 text tokens: the text's
    padding mask must not group the vision tokens."""
    model, inputs = _model("SiglipModel", image_size=32), _inputs(image_size=32)
    fast = tome_fx.optimize(model, r=2, example_inputs=inputs)
    vision = [b.index for b in _rows(fast.tome, "vision_model")]
    merges = [m for m in gu.merge_nodes(fast) if m.meta["tome"]["block"] in vision]
    assert len(merges) == VISION_BLOCKS
    assert all(gu.merge_arg(m, "groups") is None for m in merges)
    _exact_at_r0(fast, model, inputs)
