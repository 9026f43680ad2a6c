"""ToDo (issue 40): keys and values of self-attention from a downsampled or merged grid.

The reference is the authors' processor semantics written for the tests
(``reference_todo.ReferenceToDo``: processors on every ``BasicTransformerBlock.attn1`` and a
forward pre-hook for the size and timestep), on an SD1.5-shaped UNet whose level widths are
distinct (the authors pick levels by width). FLOPs are counted with the suite's counter.
"""
import copy

import pytest
import torch

import tome_fx
from diffusion_models import call, diffusers, hunyuan, relative, sdxl
from flops import counted_flops
from reference_todo import ReferenceToDo
from tome_fx.capture import capture
from tome_fx.cost.todo import KeyCost, rewrite_todo, search_grids
from tome_fx.diffusion import default_inputs
from tome_fx.kernels.todo import todo_downsample, todo_similarity
from tome_fx.kernels.tomesd import tomesd_match, tomesd_merge
from tome_fx.rules.todo import ToDo

WIDTHS = (32, 64)  # levels 1 and 2 of the UNet below (SD1.5: 320, 640)


def sd15_levels():
    """SD1.5's UNet shape with a distinct width per level (as 320/640/1280/1280)."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 96, 96), down_block_types=("CrossAttnDownBlock2D",) * 3
        + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32).eval()


def at(inputs, t):
    return dict(inputs, timestep=torch.full_like(inputs["timestep"], float(t)))


def reference(model, inputs, **args):
    ref = ReferenceToDo(copy.deepcopy(model), WIDTHS, **{"use_rand": False, **args}).apply()
    return call(ref, inputs)


@pytest.fixture(scope="module")
def unet():
    model = sd15_levels()
    return model, default_inputs(model)


@pytest.fixture(scope="module")
def captured(unet):
    model, inputs = unet
    return capture(model, inputs, image_sizes=True)


@pytest.fixture(scope="module")
def optimized(unet):
    model, _ = unet
    return tome_fx.optimize(model, method="todo", use_rand=False)


# ---------------------------------------------------------------------------------------------
# the kernels
# ---------------------------------------------------------------------------------------------

def test_downsample_kernel_reduces_each_frame_and_keeps_text():
    """Text tokens before and after pass through; each frame is pooled on its own grid."""
    b, h, w, frames, c = 2, 4, 6, 3, 5
    text0, grid, text1 = torch.randn(b, 2, c), torch.randn(b, frames, h, w, c), torch.randn(b, 3, c)
    x = torch.cat([text0, grid.reshape(b, -1, c), text1], 1)
    out, size = todo_downsample(x, h, w, 2, 3, "avg_pool", start=2, frames=frames, factor=2,
                                sizes=True)
    frames_first = grid.reshape(b * frames, h, w, c).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.avg_pool2d(frames_first, 2)
    want = torch.cat([text0, pooled.permute(0, 2, 3, 1).reshape(b, -1, c), text1], 1)
    torch.testing.assert_close(out, want)
    assert size[..., 0].tolist() == [[1, 1] + [4.0] * 18 + [1, 1, 1]] * b
    heads = todo_downsample(x.reshape(b, 1, -1, c).expand(b, 2, -1, c), h, w, 2, 3, "avg_pool",
                            2, frames, 2)  # SDPA's [B, heads, N, d]
    torch.testing.assert_close(heads, want[:, None].expand(b, 2, -1, c))


def test_similarity_kernel_is_tomesd_on_the_image_tokens():
    b, h, w, c = 2, 6, 6, 8
    img, text = torch.randn(b, h * w, c), torch.randn(b, 4, c)
    out, size = todo_similarity(torch.cat([img, text], 1), h, w, ratio=0.5, sizes=True)
    match = tomesd_match(img, h, w, 2, 2, 0.5)
    torch.testing.assert_close(out, torch.cat([tomesd_merge(img, match), text], 1))
    assert out.shape[1] == h * w - 18 + 4
    assert float(size.sum()) == b * (h * w + 4)  # every token is held once


# ---------------------------------------------------------------------------------------------
# the authors' function
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,reduced", [(999, 3), (100, 6)])
def test_same_function_as_the_authors(unet, optimized, t, reduced):
    """Before the switch: keys/values downsampled 2x at level 1 (3 self-attentions); after it:
    similarity merging at ratio 0.5 at levels 1 and 2 (6)."""
    model, inputs = unet
    x = at(inputs, t)
    assert relative(call(optimized, x), reference(model, x)) <= 1e-4
    assert optimized.tome_counts["kv_reduce"] == reduced
    assert relative(call(optimized, x), call(model, x)) > 1e-3  # it did change the function


@pytest.mark.parametrize("method", ["avg_pool", "max_pool", "bilinear"])
def test_downsample_methods_are_the_authors(unet, captured, method):
    model, inputs = unet
    rw = rewrite_todo(captured, ToDo(method=method))
    x = at(inputs, 999)
    assert relative(call(rw.graph_module, x), reference(model, x, downsample_method=method)) <= 1e-4


def test_factor_one_and_ratio_zero_are_the_original(captured, unet):
    _, inputs = unet
    plain = call(captured.graph_module, inputs)
    for method in (ToDo(factor=(1.0, 1.0)), ToDo("similarity", ratio=(0.0, 0.0))):
        rw = rewrite_todo(captured, method)
        assert rw.counts["kv_reduce"] == 0
        assert torch.equal(call(rw.graph_module, inputs), plain)


def test_proportional_attention_matches_explicit_softmax(unet, captured):
    """prop_attn: log(size) of the merged keys in the logits (folded, one SDPA) equals the
    explicit softmax with the bias."""
    model, inputs = unet
    rw = rewrite_todo(captured, ToDo("similarity", prop_attn=True))
    x = at(inputs, 100)
    want = reference(model, x, prop=True)
    assert relative(call(rw.graph_module, x), want) <= 1e-5
    assert relative(want, reference(model, x)) > 1e-4  # the sizes matter here
    folded = tome_fx.optimize(model, method="todo", prop_attn="fold", use_rand=False)
    assert relative(call(folded, x), want) <= 1e-5  # optimize's prop_attn="fold" turns it on


# ---------------------------------------------------------------------------------------------
# the switch
# ---------------------------------------------------------------------------------------------

def test_one_graph_per_branch(unet, optimized):
    _, inputs = unet
    for t in (999, 100, 0, 999, 500):
        call(optimized, at(inputs, t))
    assert len(optimized.graphs) == 3  # downsample, similarity, none
    assert [g.tome_counts["kv_reduce"] for g in optimized.graphs] == [3, 6, 0]
    mixed = dict(inputs, timestep=torch.tensor([999.0, 100.0]))
    with pytest.raises(ValueError, match="fall in different branches"):
        optimized(**mixed)


def test_errors_are_one_line(unet):
    model, _ = unet
    with pytest.raises(TypeError, match="unexpected arguments for method='todo': merge_mlp"):
        tome_fx.optimize(model, method="todo", merge_mlp=True)
    with pytest.raises(ValueError, match="downsample_method must be one of"):
        tome_fx.optimize(model, method="todo", downsample_method="cubic")
    with pytest.raises(ValueError, match="downsample_factor must be an int >= 1"):
        tome_fx.optimize(model, method="todo", downsample_factor=0)
    with pytest.raises(ValueError, match="pass either ratio or flops_budget"):
        tome_fx.optimize(model, method="todo", ratio=0.3, flops_budget=0.7)
    with pytest.raises(ValueError, match="method='todo' takes no strategy"):
        tome_fx.optimize(model, method="todo", strategy="constant")
    with pytest.raises(ValueError, match="method='todo' takes no prop_attn='bias'"):
        tome_fx.optimize(model, method="todo", prop_attn="bias")
    with pytest.raises(ValueError, match="method='todo' takes its options or flops_budget, not r"):
        tome_fx.optimize(model, method="todo", r=2)
    with pytest.raises(ValueError, match="secondary_merge_method must be one of"):
        tome_fx.optimize(model, method="todo", secondary_merge_method="avg")
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="not a diffusers model"):
        tome_fx.optimize(plain, method="todo")


# ---------------------------------------------------------------------------------------------
# other models
# ---------------------------------------------------------------------------------------------

def test_sdxl_level_one_is_its_finest_attention_level():
    """SDXL has no attention at its first level: level 1 is downsample 2, where every
    self-attention (counted by hooks on the model) gets a quarter of the keys."""
    model = sdxl(size=16, layers=(1, 1, 1))
    inputs = default_inputs(model)
    seen = []
    hooks = [m.attn1.register_forward_pre_hook(lambda _, a, kw: seen.append(
        (a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)
             for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
    call(model, inputs)
    for h in hooks:
        h.remove()
    rw = rewrite_todo(capture(model, inputs, image_sizes=True), ToDo())
    first = rw.plan.levels[0]
    assert (first.downsample, first.grid, first.r) == (2, (8, 8), 48)
    assert rw.counts["kv_reduce"] == seen.count(64) > 0


def test_rotary_keys_are_reduced_after_the_rotary_embedding():
    """HunyuanDiT applies rotary embedding to the keys: downsampling goes on SDPA's key and
    value inputs; similarity merging there is refused with the reason."""
    model = hunyuan()
    inputs = default_inputs(model)
    cap = capture(model, inputs, image_sizes=True)
    rw = rewrite_todo(cap, ToDo())
    assert rw.counts["kv_reduce"] == 2 and rw.plan.levels[0].r == 48
    assert relative(call(rw.graph_module, inputs), call(cap.graph_module, inputs)) > 1e-3
    refused = rewrite_todo(cap, ToDo("similarity"))
    assert refused.counts["kv_reduce"] == 0
    assert "rotary" in refused.plan.skipped[0].reason


# ---------------------------------------------------------------------------------------------
# budget, compile, export
# ---------------------------------------------------------------------------------------------

def test_budget_lands_in_the_window():
    """SDXL-shaped (no attention at the first level, three transformer layers at the next) at a
    64x64 latent, where attention is enough of the FLOPs to reach 0.7: counted FLOP ratio in
    [0.69, 0.70] (~30 s)."""
    model = sdxl(size=64, layers=(1, 3, 1))
    inputs = default_inputs(model)
    out = tome_fx.optimize(model, method="todo", flops_budget=0.7, example_inputs=inputs)
    ratio = counted_flops(lambda: out(**inputs)) / counted_flops(lambda: model(**inputs))
    assert 0.69 <= ratio <= 0.7
    assert out.tome.ratio == pytest.approx(ratio, abs=1e-3)  # the plan prices itself


def test_budget_search_on_the_closed_form():
    """FLOPs linear in kept keys: level 1 alone where it reaches, then level 2; out of reach
    names the least ratio (both levels down to one key)."""
    cost = KeyCost(1000.0, {1: (8, 8), 2: (4, 4)}, {1: 2.0, 2: 10.0})
    grids = search_grids(cost, 0.9)  # 50 keys of level 1 at most
    kept = {lv: h * w for lv, (_, h, w) in grids.items()}
    assert kept[2] == 16 and 0.89 <= cost.flops(kept) / 1000 <= 0.9
    grids = search_grids(cost, 0.8)  # level 1 reaches 0.874 alone: level 2 too
    kept = {lv: h * w for lv, (_, h, w) in grids.items()}
    assert kept[2] < 16 and 0.79 <= cost.flops(kept) / 1000 <= 0.8
    with pytest.raises(ValueError, match="below the least reachable FLOP ratio 0.7240"):
        search_grids(cost, 0.7)


def test_budget_search_cuts_level_two_least():
    """Where level 1's grid steps skip the window (a step of 15 keys is 3% of the FLOPs), level
    2 is cut as little as any landing pair allows (brute force over every pair), level 1 then
    kept as large as it can: a hard cut of the coarser level costs more quality (RESULTS.md,
    image quality). The search before kept level 1 whole at 0.9 and cut level 2 to 30 of 64."""
    cost = KeyCost(1000.0, {1: (16, 16), 2: (8, 8)}, {1: 2.0, 2: 3.0})
    options = {lv: cost.options(lv) for lv in (1, 2)}
    for budget in (0.97, 0.9, 0.85, 0.7):
        pairs = [(k2, k1) for k1, _, _ in options[1] for k2, _, _ in options[2]
                 if budget - 0.01 <= cost.flops({1: k1, 2: k2}) / 1000 <= budget]
        grids = search_grids(cost, budget)
        kept = {lv: k for lv, (k, _, _) in grids.items()}
        assert (kept[2], kept[1]) == max(pairs)
        assert budget - 0.01 <= cost.flops(kept) / 1000 <= budget
    assert kept[2] == 36  # 0.7 needs level 2: level 1 alone skips the window there


def test_similarity_budget_on_the_closed_form():
    """Similarity merging keeps any count down to one key per window, and its matching adds a
    level's overhead once that level is reduced at all."""
    cost = KeyCost(1000.0, {1: (8, 8)}, {1: 2.0}, overhead={1: 6.0}, least={1: 16})
    (k, nh, nw), = search_grids(cost, 0.95).values()
    assert nh is None and 0.94 <= (1000 - 2.0 * (64 - k) + 6.0) / 1000 <= 0.95
    with pytest.raises(ValueError, match=r"least reachable FLOP ratio 0\.9100 .* one key per window"):
        search_grids(cost, 0.9)  # 48 keys removed at most: 1000 - 96 + 6


def test_similarity_only_budget_lands(unet):
    """Keys and values merged by similarity at every step (the switch past 1): the budget is met
    in that branch, the matching's FLOPs included; counted at two timesteps."""
    model, inputs = unet
    out = tome_fx.optimize(model, method="todo", timestep_threshold_switch=1.0,
                           prop_attn="fold", flops_budget=0.95, example_inputs=inputs)
    for t in (999, 300):
        x = at(inputs, t)
        ratio = counted_flops(lambda: out(**x)) / counted_flops(lambda: model(**x))
        assert 0.94 <= ratio <= 0.95, t
    assert "in the similarity branch" in "\n".join(out.tome.notes)


def test_compiled_branch_has_no_graph_break(unet, captured):
    _, inputs = unet
    gm = rewrite_todo(captured, ToDo("similarity")).graph_module  # the branch with matching
    compiled = torch.compile(gm, fullgraph=True, backend="eager")  # a graph break raises
    torch.testing.assert_close(call(compiled, inputs), call(gm, inputs))


@pytest.mark.slow
def test_pt2_round_trip(tmp_path, unet, optimized):
    _, inputs = unet
    x = at(inputs, 999)
    call(optimized, x)
    done = tome_fx.export(optimized, tmp_path / "todo.pt2", example_inputs=x)
    assert max(done.max_diff.values()) <= 1e-4
