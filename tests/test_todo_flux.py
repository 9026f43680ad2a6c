"""ToDo on Flux and Wan (issue 40): keys and values of the image tokens downsampled after the
rotary embedding (at SDPA's inputs), text tokens never reduced, frames never mixed; Flux's
timestep read on the 0..1000 schedule; budgets counted by the suite's counter.

The reference is the model itself with SDPA wrapped (``kv_by_hand``): every self-attention's
keys and values have their image tokens downsampled by hand (``F.interpolate`` per frame), the
way diffusers' native backend calls ``torch.nn.functional.scaled_dot_product_attention``.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from diffusion_models import flux, flux_images, flux_inputs, relative, wan
from flops import counted_flops

import tome_fx  # noqa: E402
from tome_fx.capture import capture  # noqa: E402
from tome_fx.cost.todo import rewrite_todo  # noqa: E402
from tome_fx.diffusion import default_inputs  # noqa: E402
from tome_fx.kernels.todo import todo_downsample  # noqa: E402
from tome_fx.rules.todo import ToDo, step_scale  # noqa: E402

GRID, TEXT = (6, 8), 8  # non-square: rows and columns cannot be swapped unnoticed
WAN = (4, 3, 8, 8)  # channels, frames, latent 8x8: 3 frames of a 4x4 grid of 2x2 patches


@contextlib.contextmanager
def kv_by_hand(start: int, frames: int, h: int, w: int, mode: str = "nearest-exact"):
    """SDPA with the keys and values of tokens ``[start, start + frames*h*w)`` downsampled 2x
    per side, each frame on its own grid; cross-attention (fewer keys than queries) untouched."""
    sdpa = F.scaled_dot_product_attention

    def reduce(x):
        b, heads, _, d = x.shape
        img = x[:, :, start:start + frames * h * w].reshape(b * heads * frames, h, w, d)
        small = F.interpolate(img.permute(0, 3, 1, 2), size=(h // 2, w // 2), mode=mode)
        small = small.permute(0, 2, 3, 1).reshape(b, heads, -1, d)
        return torch.cat([x[:, :, :start], small, x[:, :, start + frames * h * w:]], 2)

    def patched(query, key, value, *args, **kwargs):
        if key.shape[-2] == query.shape[-2]:
            key, value = reduce(key), reduce(value)
        return sdpa(query, key, value, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def sample(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.sample if hasattr(out, "sample") else out[0]


def at(inputs, t):
    return dict(inputs, timestep=torch.full_like(inputs["timestep"], float(t)))


@pytest.fixture(scope="module")
def model():
    return flux()


@pytest.fixture(scope="module")
def captured(model):
    return capture(model, flux_inputs(*GRID, text=TEXT), image_sizes=True)


def test_flux_factor_one_is_the_model(model, captured):
    inputs = flux_inputs(*GRID, text=TEXT)
    rw = rewrite_todo(captured, ToDo(factor=(1.0, 1.0)))
    assert rw.counts["kv_reduce"] == 0
    assert torch.equal(sample(rw.graph_module, inputs), sample(model, inputs))
    fast = tome_fx.optimize(model, method="todo", downsample_factor=1, example_inputs=inputs)
    assert torch.equal(sample(fast, inputs), sample(model, inputs))


def test_flux_text_keys_never_reduced(captured):
    """Both attentions (joint and single-stream) reduce keys and values at SDPA's inputs:
    8 text + 48 image tokens in, 8 + 12 out, the text rows passed through unchanged."""
    inputs = flux_inputs(*GRID, text=TEXT)
    rw = rewrite_todo(captured, ToDo())
    seen = []

    def spy(x, *args):
        out = todo_downsample(x, *args)
        seen.append((x.shape[-2], out.shape[-2], torch.equal(out[..., :TEXT, :], x[..., :TEXT, :])))
        return out

    for n in rw.graph_module.graph.nodes:
        if n.target is todo_downsample:
            n.target = spy
    rw.graph_module.recompile()
    sample(rw.graph_module, inputs)
    assert seen == [(TEXT + 48, TEXT + 12, True)] * 4  # keys and values of 2 attentions
    assert [row.r for row in rw.plan.blocks] == [36, 36]
    assert rw.plan.skipped[-1].site.startswith("transformer_blocks.0.attn")  # the text stream


def test_flux_equals_keys_downsampled_by_hand(model):
    """optimize(method="todo") at its defaults and Flux's timestep 0.5 (step 500: the
    downsample branch) against the model with SDPA's image keys and values downsampled."""
    inputs = flux_inputs(*GRID, text=TEXT)
    fast = tome_fx.optimize(model, method="todo", use_rand=False, example_inputs=inputs)
    ours = sample(fast, inputs)
    with kv_by_hand(TEXT, 1, *GRID):
        want = sample(model, inputs)
    assert relative(ours, want) <= 1e-4
    assert relative(ours, sample(model, inputs)) > 1e-3  # it did change the function


def test_flux_timestep_is_read_on_its_scale(model):
    """Flux multiplies its timestep by 1000 (its pipeline passes t/1000): 0.5 is step 500
    (downsample), 0.1 step 100 (similarity: refused after the rotary embedding, with the
    reason), 0 step 0 (none). A UNet-like Wan reads its step as given."""
    inputs = flux_inputs(*GRID, text=TEXT)
    assert step_scale(capture(model, inputs).graph_module) == 1000.0
    w = wan()
    assert step_scale(capture(w, default_inputs(w, size=WAN)).graph_module) == 1.0
    fast = tome_fx.optimize(model, method="todo", use_rand=False, example_inputs=inputs)
    for t in (0.5, 0.1, 0.0):
        sample(fast, at(inputs, t))
    assert [g.tome_counts["kv_reduce"] for g in fast.graphs] == [2, 0, 0]
    assert "rotary" in fast.graphs[1].tome.skipped[-1].reason


def test_flux_budget_lands():
    """flops_budget=0.7 on a 32x32 packed grid (attention a large share), counted."""
    model = flux()
    inputs = flux_inputs(32, 32, text=TEXT)
    fast = tome_fx.optimize(model, method="todo", flops_budget=0.7, example_inputs=inputs)
    ratio = counted_flops(lambda: fast(**inputs)) / counted_flops(lambda: model(**inputs))
    assert 0.69 <= ratio <= 0.7


def test_flux_pipeline_two_sizes(model):
    """``pipe.transformer = optimize(model, method="todo")`` in a FluxPipeline of small
    components: images at 16x16 and 24x16 (8x8 and 12x8 packed grids, each captured for its
    ids), finite, of the right shape, and not the model's."""
    sizes = ((16, 16), (24, 16))
    plain = flux_images(model, sizes, TEXT)
    fast = tome_fx.optimize(model, method="todo", use_rand=False,
                            example_inputs=flux_inputs(8, 8, text=TEXT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = flux_images(model, sizes, TEXT, fast=fast)
    for (h, w), a, b in zip(sizes, ours, plain):
        assert a.shape == b.shape == (1, 3, h, w) and torch.isfinite(a).all()
        assert relative(a, b) > 1e-4
    assert all(g.tome_counts["kv_reduce"] == 2 for g in fast.graphs)


# ---------------------------------------------------------------------------------------------
# Wan: per frame
# ---------------------------------------------------------------------------------------------

def test_kernel_reduces_each_frame_on_its_own():
    """SDPA's [B, heads, frames*h*w, d] keys: the kernel equals each frame interpolated alone."""
    torch.manual_seed(0)
    b, heads, frames, h, w, d = 2, 3, 4, 6, 4, 5
    x = torch.randn(b, heads, frames * h * w, d)
    out = todo_downsample(x, h, w, 3, 2, "bilinear", frames=frames)
    by_frame = []
    for f in range(frames):
        img = x[:, :, f * h * w:(f + 1) * h * w].reshape(b * heads, h, w, d).permute(0, 3, 1, 2)
        small = F.interpolate(img, size=(3, 2), mode="bilinear")
        by_frame.append(small.permute(0, 2, 3, 1).reshape(b, heads, 6, d))
    torch.testing.assert_close(out, torch.cat(by_frame, 2))


def test_wan_reduces_per_frame_after_rotary():
    """Wan's rotary embedding writes the keys in place: the reduction goes on SDPA's inputs,
    frame by frame (3 frames of 4x4 -> 3 x 2x2 keys), equal to the model with its keys and
    values downsampled by hand per frame; factor 1 is the model exactly."""
    model = wan()
    inputs = default_inputs(model, size=WAN)
    fast = tome_fx.optimize(model, method="todo", use_rand=False, example_inputs=inputs)
    assert fast.tome.blocks[0].r == 36
    with kv_by_hand(0, 3, 4, 4):
        want = sample(model, inputs)
    ours = sample(fast, inputs)
    assert relative(ours, want) <= 1e-4 and relative(ours, sample(model, inputs)) > 1e-3
    one = tome_fx.optimize(model, method="todo", downsample_factor=1, example_inputs=inputs)
    assert torch.equal(sample(one, inputs), sample(model, inputs))


def test_wan_budget_lands():
    """flops_budget=0.7 on 2 frames of a 64x64 latent (32x32 patches each), counted."""
    model = wan()
    inputs = default_inputs(model, size=(4, 2, 64, 64))
    fast = tome_fx.optimize(model, method="todo", flops_budget=0.7, example_inputs=inputs)
    ratio = counted_flops(lambda: fast(**inputs)) / counted_flops(lambda: model(**inputs))
    assert 0.69 <= ratio <= 0.7


def test_flux_branch_compiles_without_graph_break(captured):
    """The downsample graph (grid_rows' check included) compiles as one graph."""
    inputs = flux_inputs(*GRID, text=TEXT)
    gm = rewrite_todo(captured, ToDo()).graph_module
    compiled = torch.compile(gm, fullgraph=True, backend="eager")  # a graph break raises
    torch.testing.assert_close(sample(compiled, inputs), sample(gm, inputs))
