"""ToMeSD (issue 29): local merging in diffusers UNets and diffusion transformers.

The reference is the authors' code: ``tomesd.apply_patch`` on SD-shaped UNets, and their merge
function ``tomesd.merge.bipartite_soft_matching_random2d`` through hooks where their patch does
not reach (``diffusion_models.HookedToMeSD``). FLOPs are counted with the suite's counter.
"""
import copy
import re

import pytest
import torch

import tome_fx
from tome_fx import graph as gu
from diffusion_models import (HookedToMeSD, call, dit, pixart, relative, sd3, sd15, sdxl,
                              square, tomesd)
from flops import counted_flops
from models import TinyTransformer
from tome_fx.capture import capture
from tome_fx.cost.tomesd import rewrite_tomesd
from tome_fx.diffusion import default_inputs
from tome_fx.kernels.tomesd import split_grid, tomesd_match, tomesd_merge, tomesd_unmerge
from tome_fx.rules.tomesd import from_options


def _rewrite(captured, budget=None, **options):
    options.setdefault("use_rand", False)
    return rewrite_tomesd(captured, from_options(options, budget is not None), budget)


def _patched(model, **options):
    out = copy.deepcopy(model)
    tomesd.apply_patch(out, use_rand=False, **options)
    return out


# ---------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w,sx,sy,ratio", [(8, 8, 2, 2, 0.5), (7, 10, 2, 2, 0.5),
                                              (9, 9, 3, 2, 0.6), (4, 6, 2, 2, 0.9)])
def test_kernel_is_the_authors_merge(h, w, sx, sy, ratio):
    """The same merged tokens (unmerged sources in the authors' order; destinations in window
    order, theirs come from an unstable sort) and the same unmerged result of a per-token op, also
    on grids the windows do not divide (their top-left view) and past the most sources."""
    x, y = torch.randn(2, h * w, 5), torch.randn(2, h * w, 5)
    merge, unmerge = tomesd.merge.bipartite_soft_matching_random2d(
        x, w, h, sx, sy, int(h * w * ratio), no_rand=True)
    match = tomesd_match(x, h, w, sx, sy, ratio)
    ours, theirs = tomesd_merge(y, match), merge(y)
    n_unm = ours.shape[1] - (h // sy) * (w // sx)
    torch.testing.assert_close(ours[:, :n_unm], theirs[:, :n_unm])
    by_value = lambda t: t.gather(1, t[..., :1].argsort(1).expand_as(t))  # noqa: E731
    torch.testing.assert_close(by_value(ours[:, n_unm:]), by_value(theirs[:, n_unm:]))
    torch.testing.assert_close(tomesd_unmerge(torch.tanh(ours), match), unmerge(torch.tanh(theirs)))
    assert tomesd_match(x, h, w, sx, sy, 0.0) is None  # ratio 0: nothing computed
    assert tomesd_merge(y, None) is y


def test_seeded_random_destinations():
    """use_rand with a seed: the same seed and step give the same match, another step another
    one, and not the top-left destinations; each window has one destination, where asked."""
    x = torch.randn(2, 64, 5)
    step = torch.tensor([10.0, 10.0])
    a = tomesd_match(x, 8, 8, 2, 2, 0.5, use_rand=True, seed=1, step=step)
    b = tomesd_match(x, 8, 8, 2, 2, 0.5, use_rand=True, seed=1, step=step)
    c = tomesd_match(x, 8, 8, 2, 2, 0.5, use_rand=True, seed=1, step=step + 1)
    fixed = tomesd_match(x, 8, 8, 2, 2, 0.5)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], fixed[0])
    off = torch.randint(0, 6, (2, 2))  # 7x5 grid, 3 high 2 wide windows: 2x2 of them
    order = split_grid(7, 5, 2, 3, off)
    rows, cols = order[:4] // 5, order[:4] % 5
    assert torch.equal(rows, (torch.arange(2)[:, None] * 3 + off // 2).reshape(-1))
    assert torch.equal(cols, (torch.arange(2)[None, :] * 2 + off % 2).reshape(-1))
    assert sorted(order.tolist()) == list(range(35))


class _DictInput(torch.nn.Module):
    """Takes a dict of tensors (as SDXL's ``added_cond_kwargs``); fx cannot trace its branch."""

    def forward(self, x, cond):
        if x.shape[-1] > 1:
            x = x * 2
        return x + cond["a"] * cond["b"]


def test_nested_inputs_run_in_the_captured_graph():
    """Export flattens a dict input into several placeholders; runs of the captured graph (shape
    recording, checks) give each its value instead of None."""
    x, cond = torch.randn(2, 3, 4), {"a": torch.randn(2, 3, 4), "b": torch.randn(2, 3, 4)}
    captured = capture(_DictInput(), {"x": x, "cond": cond})
    assert captured.frontend == "export"
    shapes, out = gu.record_shapes(captured.graph_module, captured.args, captured.kwargs)
    torch.testing.assert_close(out, _DictInput()(x, cond))


# ---------------------------------------------------------------------------------------------
# SD1.5-shaped UNet: the authors' function
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet15():
    model = sd15()
    inputs = default_inputs(model)
    return model, inputs, capture(model, inputs)


@pytest.fixture(scope="module")
def merged15(unet15):
    """The UNet at ratio 0.5, the authors' defaults (self-attention at the finest level)."""
    return _rewrite(unet15[2], ratio=0.5)


@pytest.mark.parametrize("options", [
    dict(), dict(merge_crossattn=True, merge_mlp=True, max_downsample=8)],
    ids=["attn", "all-ops-all-levels"])
def test_unet_is_the_authors_tomesd(unet15, merged15, options):
    model, inputs, captured = unet15
    rw = _rewrite(captured, ratio=0.5, **options) if options else merged15
    ours = call(rw.graph_module, inputs)
    theirs = call(_patched(model, ratio=0.5, **options), inputs, first_positional=True)
    assert relative(ours, theirs) <= 1e-4
    assert relative(ours, call(model, inputs)) > 1e-3  # it merged
    assert rw.counts["merges"] == (3 if not options else 3 * 10)


def test_unet_plan_per_level(merged15):
    text = str(merged15.plan)
    for level in (r"1\s+16x16\s+256\s+0.500\s+128\s+3\s+62.9\s+23.6",  # tokens, ratio, r, FLOPs
                  r"8\s+2x2\s+4\s+0.000\s+0\s+0"):
        assert re.search(level, text), text
    assert re.search(r"ratio 0.91\d\d", text)


def test_unet_ratio_zero(unet15, merged15):
    """Every match of the rewritten graph at r = 0 is the original; so is ratio 0 (no merge)."""
    model, inputs, captured = unet15
    with gu.merges_at(merged15.graph_module, 0):
        assert relative(call(merged15.graph_module, inputs), call(model, inputs)) <= 1e-5
    rw = _rewrite(captured, ratio=0.0)
    assert rw.counts["merges"] == 0 and rw.plan.flops is None
    assert relative(call(rw.graph_module, inputs), call(model, inputs)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,message", [
    (dict(ratio=1.0), "ratio must be in [0, 1), got 1.0"),
    (dict(ratio=-0.1), "ratio must be in [0, 1), got -0.1"),
    (dict(ratio={1: 0.9, 2: 1.5}), "ratio[2] must be in [0, 1), got 1.5"),
    (dict(ratio=0.5, sx=0), "sx must be an int >= 1, got 0"),
    (dict(ratio=0.5, sx=1, sy=1), "sx * sy must be at least 2"),
    (dict(ratio=0.5, merge_attn=False), "merge_attn, merge_crossattn and merge_mlp are all False"),
    (dict(ratio=0.5, max_downsample=0), "max_downsample must be an int >= 1, got 0"),
    (dict(ratio=0.5, flops_budget=0.5), "pass either ratio or flops_budget, not both"),
    (dict(), "method='tomesd' needs ratio=... or flops_budget=..."),
    (dict(ratio=0.5, r=8), "method='tomesd' takes ratio or flops_budget, not r"),
    (dict(ratio=0.5, prop_attn="fold"), "method='tomesd' takes no prop_attn"),
    (dict(flops_budget=0.5, strategy="constant"), "method='tomesd' takes no strategy"),
])
def test_bad_options(options, message):
    """Checked before anything is captured: one line naming the option."""
    with pytest.raises(ValueError) as err:
        tome_fx.optimize(torch.nn.Linear(2, 2), method="tomesd", **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_option():
    with pytest.raises(TypeError, match="unexpected arguments for method='tomesd': block"):
        tome_fx.optimize(torch.nn.Linear(2, 2), method="tomesd", ratio=0.5, block=1)


def test_no_token_grid():
    """A transformer over a sequence (no [B, C, h, w] tensor makes its tokens)."""
    with pytest.raises(ValueError, match=r"method='tomesd' needs a transformer block over a 2-D "
                                         r"token grid: the tokens do not form a 2-D grid") as err:
        tome_fx.optimize(TinyTransformer(), method="tomesd", ratio=0.5,
                         example_inputs=torch.randn(2, 17, 16))
    assert "\n" not in str(err.value)


def test_grid_smaller_than_window(unet15):
    """Only the 2x2 grid of the middle block chosen, with 3x3 windows: the reason, one line."""
    model, inputs, captured = unet15
    with pytest.raises(ValueError, match=r"merges nothing in UNet2DConditionModel: the 2x2 grid "
                                         r"is smaller than one 3x3 window"):
        _rewrite(captured, ratio={8: 0.5}, sx=3, sy=3)


# ---------------------------------------------------------------------------------------------
# in a diffusers pipeline
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # twin of test_diffusion_pipelines.py's FreeU pipeline test at two sizes
def test_stable_diffusion_pipeline():
    """``pipe.unet = tome_fx.optimize(pipe.unet, ...)`` with nothing else given: images equal to
    the authors' patch of the same pipeline, two denoising steps with guidance."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4,
                        norm_num_groups=32).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=sd15(),
                                   scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    text, empty = torch.randn(1, 77, 32), torch.randn(1, 77, 32)

    def images():
        return pipe(prompt_embeds=text, negative_prompt_embeds=empty, num_inference_steps=2,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images

    unet = pipe.unet
    pipe.unet = tome_fx.optimize(unet, method="tomesd", ratio=0.5, use_rand=False)
    assert pipe.unet.config.in_channels == 4 and pipe.unet.dtype == torch.float32
    ours = images()
    pipe.unet = unet
    tomesd.apply_patch(pipe, ratio=0.5, use_rand=False)
    assert relative(ours, images()) <= 1e-4


# ---------------------------------------------------------------------------------------------
# SDXL: attention from the second level on, several layers per block, added conditioning
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet_xl():
    model = sdxl()
    inputs = default_inputs(model)
    return model, inputs, capture(model, inputs)


def test_sdxl_merges_by_default(unet_xl):
    """The authors' default (max_downsample=1) merges nothing in SDXL, whose finest level has
    no attention; the default here is the finest level with attention. Same function as the
    authors' code told to go there."""
    model, inputs, captured = unet_xl
    rw = _rewrite(captured, ratio=0.5)
    assert [lv.downsample for lv in rw.plan.levels if lv.ratio] == [2]
    theirs = call(_patched(model, ratio=0.5, max_downsample=2), inputs, first_positional=True)
    assert relative(call(rw.graph_module, inputs), theirs) <= 1e-4
    with pytest.raises(ValueError, match=r"merges nothing in UNet2DConditionModel: its "
                                         r"transformer blocks are at downsample 2, 4, above "
                                         r"max_downsample=1; pass max_downsample=2 or more"):
        _rewrite(captured, ratio=0.5, max_downsample=1)


def test_sdxl_budget(unet_xl):
    model, inputs, captured = unet_xl
    rw = _rewrite(captured, 0.7, merge_crossattn=True, merge_mlp=True)
    ratio = counted_flops(rw.graph_module, **inputs) / counted_flops(model, **inputs)
    assert 0.69 <= ratio <= 0.7
    assert rw.plan.ratio == pytest.approx(ratio, abs=1e-6)
    assert all(lv.flops is not None and lv.flops < lv.flops_original
               for lv in rw.plan.levels if lv.ratio)


@pytest.mark.slow
def test_sdxl_budget_default_ops_full_latent():
    """At a 64x64 latent the self-attention alone meets 0.7."""
    model = sdxl(size=64)
    inputs = default_inputs(model)
    fast = tome_fx.optimize(model, method="tomesd", flops_budget=0.7, use_rand=False)
    ratio = counted_flops(fast, **inputs) / counted_flops(model, **inputs)
    assert 0.69 <= ratio <= 0.7


# ---------------------------------------------------------------------------------------------
# diffusion transformers: DiT (adaLN-Zero), SD3 (MM-DiT joint attention)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dit_model():
    model = dit()
    inputs = default_inputs(model)
    return model, inputs, capture(model, inputs)


def test_dit_is_the_authors_merge(dit_model):
    model, inputs, captured = dit_model
    rw = _rewrite(captured, ratio=0.5)
    hooked = HookedToMeSD(copy.deepcopy(model), 0.5, square)
    reference = call(hooked.model, inputs)
    assert relative(call(rw.graph_module, inputs), reference) <= 1e-4
    assert relative(reference, call(model, inputs)) > 1e-3


def test_dit_budget_and_ratio_zero(dit_model):
    model, inputs, captured = dit_model
    rw = _rewrite(captured, 0.8)
    ratio = counted_flops(rw.graph_module, **inputs) / counted_flops(model, **inputs)
    assert 0.79 <= ratio <= 0.8
    zero = _rewrite(captured, ratio=0.0)
    assert relative(call(zero.graph_module, inputs), call(model, inputs)) <= 1e-5


def test_pixart_every_op():
    """PixArt: cross-attention straight on the stream (no norm before it) and adaLN-single; the
    three ops merged, against the authors' merge around each."""
    model = pixart()
    inputs = default_inputs(model)
    rw = _rewrite(capture(model, inputs), ratio=0.5, merge_crossattn=True, merge_mlp=True)
    assert rw.counts["merges"] == 6
    reference = call(HookedToMeSD(copy.deepcopy(model), 0.5, square,
                                  ops=("attn1", "attn2", "ff")).model, inputs)
    assert relative(call(rw.graph_module, inputs), reference) <= 1e-4


def test_sd3_merges_image_tokens_only():
    """Joint attention: the image tokens merge, the text tokens pass unchanged (the authors'
    merge on the image side of the attention, through hooks); ratio 0 exact, shape kept."""
    model = sd3()
    inputs = default_inputs(model)
    captured = capture(model, inputs)
    rw = _rewrite(captured, ratio=0.5)
    assert "text or other sequence tokens stay unmerged" in str(rw.plan)
    ours = call(rw.graph_module, inputs)
    reference = call(HookedToMeSD(copy.deepcopy(model), 0.5, square).model, inputs)
    assert ours.shape == inputs["hidden_states"].shape
    assert relative(ours, reference) <= 1e-4
    zero = _rewrite(captured, ratio=0.0)
    assert relative(call(zero.graph_module, inputs), call(model, inputs)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# compile, export, command line
# ---------------------------------------------------------------------------------------------

def test_compile_one_graph_and_pt2(dit_model, tmp_path):
    """Seeded random destinations included: one dynamo graph, no break, the same outputs; the
    .pt2 archive loads and computes the same."""
    from torch._dynamo.testing import CompileCounter

    model, inputs, _ = dit_model
    fast = tome_fx.optimize(model, method="tomesd", ratio=0.5, seed=3)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(fast.graph, backend=counter, fullgraph=True)
    assert relative(call(compiled, inputs), call(fast, inputs)) == 0
    assert counter.frame_count == 1
    done = tome_fx.export(fast, tmp_path / "dit.pt2", verbose=False)
    assert max(done.max_diff.values()) <= 1e-5


def test_unet_compiles_to_one_graph(unet15, merged15):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(merged15.graph_module, backend=counter, fullgraph=True)
    assert relative(call(compiled, unet15[1]), call(merged15.graph_module, unet15[1])) == 0
    assert counter.frame_count == 1


def test_cli_diffusers_directories(tmp_path, capsys):
    """A pipeline folder (model_index.json + unet/) in report, a model folder in bench."""
    import json

    from tome_fx.cli.main import main

    sd15().save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    assert main(["report", str(tmp_path / "pipe"), "--ratio", "0.5", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_class"] == "UNet2DConditionModel" and report["method"] == "tomesd"
    assert report["levels"][0]["ratio"] == 0.5 and report["levels"][0]["r"] == 128
    assert report["fidelity"]["relative_error"] > 0
    dit().save_pretrained(tmp_path / "dit")
    assert main(["bench", str(tmp_path / "dit"), "--flops-budget", "0.8", "--runs", "1",
                 "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "DiTTransformer2DModel, tomesd" in out and "FLOP ratio 0.79" in out
    assert main(["report", str(tmp_path / "dit"), "--ratio", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "tome-fx: error: ratio must be in [0, 1), got 1.5"
