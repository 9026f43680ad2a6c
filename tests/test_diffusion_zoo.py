"""ToMeSD on every diffusers model it meets (issue 38): default inputs from each config, a merge
or a one-line refusal saying what the model is, temporal attention never merged, levels read
from the latent, budgets that land, and per-sample timesteps.

Small random-weight models (``diffusion_models``); FLOPs counted with the suite's counter.
"""
import pytest
import torch

import tome_fx
from diffusion_models import (call, cogvideox, controlnet, dit, flux, hunyuan, lumina2,
                              lumina_next, motion, pixart, relative, sd3, sd15, sdxl, svd, wan)
from flops import counted_flops
from tome_fx.capture import capture
from tome_fx.cost.tomesd import rewrite_tomesd
from tome_fx.diffusion import default_inputs
from tome_fx.rules.tomesd import from_options

MERGES = {"sd15": lambda: sd15(size=8), "sdxl": lambda: sdxl(size=16, layers=(1, 1, 1)), "dit": dit, "pixart": pixart, "sd3": sd3, "svd": svd,
          "motion": motion, "controlnet": controlnet, "flux": flux}
# the model, and what the one-line error must say
REFUSED = {
    "cogvideox": (cogvideox, "its tokens are frames x an h x w grid (a video transformer)"),
    "wan": (wan, "its tokens are frames x an h x w grid (a video transformer)"),
    # its patches are cut from the latent by a reshape (a grid of 2x2 patches), RoPE per token
    "lumina_next": (lumina_next, "merges nothing in LuminaNextDiT2DModel: layers.0.attn1 (attn): "
                                 "rotary position embedding on the queries and keys "
                                 "(image_rotary_emb): merged tokens have no per-token rotary "
                                 "position"),
    # RoPE per token (image_rotary_emb) on the queries and keys: merged tokens have none
    "hunyuan": (hunyuan, "merges nothing in HunyuanDiT2DModel: blocks.0.attn1 (attn): rotary "
                         "position embedding on the queries and keys (image_rotary_emb_0, "
                         "image_rotary_emb_1): merged tokens have no per-token rotary position"),
    # capture fails before ToMeSD sees it: torch.export cannot take its RoPE position ids at a
    # dynamic image size in this torch (slow: fx and export both try)
    "lumina2": (lumina2, "torch.export failed on Lumina2Transformer2DModel"),
}
SLOW = {"lumina2"}
# ControlNet's config has no sample size (the default latent is 64x64, its image 512x512);
# Flux's default is 64x64 packed tokens: 16x16 keeps it fast
SIZES = {"controlnet": (4, 16, 16), "flux": (256, 16)}
TEMPORAL = "temporal attention: its tokens are frames"


def _rewrite(model, inputs, budget=None, **options):
    options.setdefault("use_rand", False)
    return rewrite_tomesd(capture(model, inputs), from_options(options, budget is not None),
                          budget)


def _tensors(out):
    """The output's tensors (ControlNet returns tuples of residuals)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for x in out for t in _tensors(x)] if isinstance(out, (tuple, list)) else []


@pytest.fixture(scope="module")
def optimized():
    """name -> (model, its default inputs, the optimized module), built once: no example
    inputs given (ControlNet's at a small size), random destinations (the default) at a fixed
    seed, and ControlNet at max_downsample=1."""
    cache = {}

    def get(name):
        if name not in cache:
            model = MERGES[name]()
            inputs = default_inputs(model, size=SIZES.get(name))
            given = {"example_inputs": dict(inputs)} if name in SIZES else {}
            if name == "controlnet":
                given["max_downsample"] = 1
            cache[name] = (model, inputs, tome_fx.optimize(model, method="tomesd", ratio=0.5,
                                                           seed=7, **given))
        return cache[name]
    return get


# SDXL's full twin runs by default in test_diffusion_pipelines.py (three sizes, the authors' patch)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "sdxl" else n
                                  for n in sorted(MERGES)])
def test_zoo_merges(name, optimized):
    """Runs on its own default inputs; merges with no example_inputs given; same output shape."""
    model, inputs, fast = optimized(name)
    with torch.no_grad():
        ours, theirs = _tensors(fast(**inputs)), _tensors(model(**inputs))
    assert [t.shape for t in ours] == [t.shape for t in theirs] and theirs
    merged = [row for row in fast.tome.blocks if row.r > 0]
    assert merged and all(row.tokens_out < row.tokens_in for row in merged)
    assert max(relative(a, b) for a, b in zip(ours, theirs)) > 1e-4  # it merged


@pytest.mark.parametrize("name", sorted(MERGES) + sorted(REFUSED))
def test_default_inputs_run(name):
    """Each model runs on its default inputs, laid out as its config says."""
    model = MERGES[name]() if name in MERGES else REFUSED[name][0]()
    inputs = default_inputs(model, size=SIZES.get(name))
    cfg = model.config
    latent = inputs.get("sample", inputs.get("hidden_states"))
    out = _tensors(call(model, inputs))
    assert out and all(torch.isfinite(t).all() for t in out)
    if cfg.get("num_frames"):  # SVD: [B, F, C, H, W] and fps, motion bucket, noise (as sized)
        assert latent.shape[1:3] == (cfg.num_frames, cfg.in_channels)
        assert inputs["added_time_ids"].shape[1] * cfg.addition_time_embed_dim == \
            cfg.projection_class_embeddings_input_dim
    if cfg.get("motion_max_seq_length"):  # AnimateDiff: [B, C, F, H, W], text per frame
        assert inputs["encoder_hidden_states"].shape[0] == latent.shape[0] * latent.shape[2]
    if "controlnet_cond" in inputs:  # the conditioning image at the pixels' size
        assert inputs["controlnet_cond"].shape[-1] == 8 * latent.shape[-1]
    if "controlnet_cond" not in inputs:  # a prediction at the latent's size
        assert out[0].shape[0] == latent.shape[0] and out[0].shape[-2:] == latent.shape[-2:]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(REFUSED)])
def test_zoo_refuses(name):
    """optimize raises one line saying what the model is (what ToMeSD cannot merge in it)."""
    model = REFUSED[name][0]()
    message = REFUSED[name][1]
    with pytest.raises(Exception) as err:
        tome_fx.optimize(model, method="tomesd", ratio=0.5)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("name", ["svd", "motion"])
def test_temporal_attention_never_merges(name, optimized):
    """16 frames beside a 4x4 grid: the frames' attention is refused with its reason in the
    plan, every spatial one merges."""
    model, inputs, fast = optimized(name)
    plan = fast.tome
    merged = [row.site for row in plan.blocks if row.r > 0]
    temporal = [s for s in plan.skipped if TEMPORAL in s.reason]
    assert merged and not any("temporal" in s or "motion_modules" in s for s in merged)
    assert temporal and all("temporal" in s.site or "motion_modules" in s.site for s in temporal)
    assert model.config.get("num_frames", 16) == 16 and all(lv.grid == (4, 4) for lv in plan.levels)


def test_controlnet_levels_from_the_latent(optimized):
    """The conditioning image (8x the latent's side) does not set the levels: the latent's
    finest grid is downsample 1, and max_downsample=1 merges it."""
    model, inputs, fast = optimized("controlnet")
    side = inputs["sample"].shape[-1]
    assert inputs["controlnet_cond"].shape[-1] == 8 * side
    levels = fast.tome.levels
    assert levels[0].downsample == 1 and levels[0].grid == (side, side)
    assert [lv.downsample for lv in levels if lv.ops] == [1] and len(levels) > 1


@pytest.mark.parametrize("name,budget,options", [
    ("sd3", 0.8, {}), ("dit", 0.7, {"merge_mlp": True}),
    ("pixart", 0.7, {"merge_mlp": True, "merge_crossattn": True})])
def test_budget_lands(name, budget, options):
    """Counted by the suite's counter, the FLOP ratio is within [b - 0.01, b]; SD3's joint
    attention over image and text tokens included."""
    model = MERGES[name]()
    inputs = default_inputs(model)
    rw = _rewrite(model, inputs, budget, **options)
    ratio = counted_flops(rw.graph_module, **inputs) / counted_flops(model, **inputs)
    assert budget - 0.01 <= ratio <= budget
    assert rw.plan.ratio == pytest.approx(ratio, abs=1e-4)


@pytest.mark.parametrize("name", ["dit", "sd15"])
def test_per_sample_timesteps(name, optimized):
    """Random destinations: two samples at different timesteps merge as each does alone, batch
    1 at its own timestep (its own pattern), not as the first sample's."""
    model, inputs, fast = optimized(name)
    inputs = dict(inputs, timestep=torch.tensor([100.0, 700.0]))
    both = call(fast.graph, inputs)
    for i in range(2):
        alone = {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        assert relative(both[i:i + 1], call(fast.graph, alone)) <= 1e-5
