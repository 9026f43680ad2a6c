"""ToMeSD on Flux (issue 40): the image grid read from ``img_ids``, text tokens never merged,
rotary tables taken at the merged tokens, budgets that land, another grid captured anew, and a
``FluxPipeline`` of small components at two image sizes. Also the sites of a video transformer
(Wan): frames x grid, for the methods that reduce per frame."""
from __future__ import annotations

import warnings

import pytest
import torch

from diffusion_models import flux, flux_images, flux_inputs, relative, wan
from flops import counted_flops

diffusers = pytest.importorskip("diffusers")

import tome_fx  # noqa: E402
from tome_fx.capture import capture  # noqa: E402
from tome_fx.cost.tomesd import rewrite_tomesd  # noqa: E402
from tome_fx.diffusion import default_inputs  # noqa: E402
from tome_fx.errors import ShapeError  # noqa: E402
from tome_fx.rules.local import find_local  # noqa: E402
from tome_fx.methods.tomesd import from_options  # noqa: E402
from tome_fx.pipeline import analyse  # noqa: E402

GRID, TEXT = (6, 8), 8  # a non-square grid: h and w cannot be swapped unnoticed


@pytest.fixture(scope="module")
def model():
    return flux()


def _rewrite(model, inputs, budget=None, **options):
    options.setdefault("use_rand", False)
    return rewrite_tomesd(capture(model, inputs), from_options(options, budget is not None),
                          budget)


def _sites(model, inputs):
    ctx = analyse(capture(model, inputs))
    return find_local(ctx.gm, ctx.shapes, ctx.matches.cores, (ctx.args, ctx.kwargs))


def test_sites_from_img_ids(model):
    """One attention site per block: the grid from img_ids' values (6 x 8, not the square a
    token count suggests), the image tokens after the 8 text tokens in the joint and the
    single-stream attention, the ids input kept for the check at every call."""
    sites, refusals = _sites(model, flux_inputs(*GRID, text=TEXT))
    attn = [s for s in sites if s.op == "attn"]
    assert [s.name for s in attn] == ["transformer_blocks.0.attn (attn)",
                                      "single_transformer_blocks.0.attn (attn)"]
    assert all((s.hw, s.start, s.frames, s.tokens) == (GRID, TEXT, 1, 48) for s in attn)
    assert all(s.ids is not None and s.ids.name == "img_ids" and s.grid is None for s in attn)
    # the text stream's residual around the joint attention is no grid: never merged
    assert [r.site for r in refusals] == ["transformer_blocks.0.attn (scaled_dot_product_attention)"]


def test_ratio_zero_is_the_model(model):
    """Ratio 0: every kernel passes its input through, rotary tables included: exact."""
    inputs = flux_inputs(*GRID, text=TEXT)
    rw = _rewrite(model, inputs, ratio=0.0, merge_mlp=True)
    with torch.no_grad():
        ours, theirs = rw.graph_module(**inputs).sample, model(**inputs).sample
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("use_rand", [False, True])
def test_merges_image_tokens_only(model, use_rand):
    """At ratio 0.5 half of the 48 image tokens go in each merged op; the 8 text tokens of the
    single-stream block stay (56 in, 32 out), the output keeps its shape and differs."""
    inputs = flux_inputs(*GRID, text=TEXT)
    rw = _rewrite(model, inputs, ratio=0.5, use_rand=use_rand, merge_mlp=True)
    rows = {row.site: (row.tokens_in, row.r, row.tokens_out) for row in rw.plan.blocks}
    assert rows == {"transformer_blocks.0.attn (attn)": (48, 24, 24),
                    "transformer_blocks.0 (mlp)": (48, 24, 24),
                    "single_transformer_blocks.0.attn (attn)": (56, 24, 32)}
    with torch.no_grad():
        ours, theirs = rw.graph_module(**inputs).sample, model(**inputs).sample
    assert ours.shape == theirs.shape and relative(ours, theirs) > 1e-4


def test_rotary_tables_follow_destinations():
    """A merged token keeps its destination's rotary position: the table at the merged tokens
    is the text rows, then each merged position's representative row, per sample."""
    from tome_fx.kernels.tomesd import tomesd_match, tomesd_table
    torch.manual_seed(0)
    x = torch.randn(2, 3 + 16, 8)
    match = tomesd_match(x, 4, 4, 2, 2, 0.5, use_rand=True, seed=3)
    where, count, rep = match
    table = torch.arange(19.0).reshape(1, 19, 1, 1).expand(1, 19, 1, 2)
    out = tomesd_table(table, match)
    assert out.shape == (2, 3 + 8, 1, 2)
    assert torch.equal(out[:, :3, 0, 0], torch.arange(3.0).expand(2, 3))
    assert torch.equal(out[:, 3:, 0, 0], 3 + rep.float())
    # each representative is a token of its own group: destinations hold themselves
    assert torch.equal(where.gather(1, rep), torch.arange(8).expand(2, 8))


def test_budget_lands(model):
    """flops_budget=0.7, counted by the suite's counter, lands in [0.69, 0.7]."""
    inputs = flux_inputs(16, 16, text=TEXT)
    rw = _rewrite(model, inputs, 0.7, merge_mlp=True)
    ratio = counted_flops(rw.graph_module, **inputs) / counted_flops(model, **inputs)
    assert 0.69 <= ratio <= 0.7
    assert rw.plan.ratio == pytest.approx(ratio, abs=1e-4)


def test_another_grid_is_captured_anew(model):
    """The width is read from img_ids at capture: a graph called with another grid of the same
    token count (8 x 6 instead of 6 x 8) raises a one-line ShapeError, and the module optimize
    returns captures that grid again, equal to a module optimized for it."""
    first, other = flux_inputs(*GRID, text=TEXT), flux_inputs(8, 6, text=TEXT, seed=1)
    fast = tome_fx.optimize(model, method="tomesd", ratio=0.5, use_rand=False,
                            example_inputs=first)
    with pytest.raises(ShapeError) as err, torch.no_grad():
        fast.graph(**other)
    assert "width 8" in str(err.value) and "\n" not in str(err.value)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        ours = fast(**other).sample
    assert any("captured" in str(c.message) for c in caught) and len(fast.graphs) == 2
    direct = tome_fx.optimize(model, method="tomesd", ratio=0.5, use_rand=False,
                              example_inputs=other)
    with torch.no_grad():
        assert relative(ours, direct(**other).sample) <= 1e-6
    # compiled: the module checks the ids on the host before the graph's own (device) assert
    compiled = tome_fx.optimize(model, method="tomesd", ratio=0.5, use_rand=False,
                                example_inputs=first, compile={"backend": "eager"})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        assert relative(compiled(**other).sample, ours) <= 1e-6
    assert len(compiled.graphs) == 2


@pytest.mark.parametrize("ratio", [0.5, pytest.param(0.0, marks=pytest.mark.slow)])
def test_flux_pipeline_two_sizes(model, ratio):
    """``pipe.transformer = optimize(pipe.transformer)`` in a FluxPipeline of small components
    (text embeddings given: no tokenizer offline): images at 16x16 and 24x16 (8x8 and 12x8
    packed grids, each captured for its ids) that differ from the model's at ratio 0.5 and
    equal them at ratio 0."""
    sizes = ((16, 16), (24, 16))
    plain = flux_images(model, sizes, TEXT)
    fast = tome_fx.optimize(model, method="tomesd", ratio=ratio, use_rand=False,
                            example_inputs=flux_inputs(8, 8, text=TEXT))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = flux_images(model, sizes, TEXT, fast=fast)
    assert fast.tome.blocks[0].r == int(64 * ratio)  # the 8x8 example's plan
    # the example's graph takes both grids (width 8); the pipeline's cache_context every step
    # and its cache reset after the last step keep it (they captured again every step)
    assert not [c for c in caught if "captured" in str(c.message)]
    assert len(fast.graphs) == 1
    for (h, w), a, b in zip(sizes, ours, plain):
        assert a.shape == b.shape == (1, 3, h, w) and torch.isfinite(a).all()
        assert relative(a, b) <= 1e-6 if ratio == 0 else relative(a, b) > 1e-4


def test_wan_sites_frames_grid():
    """Wan's tokens are frames x h x w of its 3-D patch embedding: the self-attention site has
    frames=3, hw=(4, 4) (an 8x8 latent, 2x2 patches), start 0 (text is cross-attention);
    ToMeSD refuses it with the reason."""
    model = wan()
    inputs = default_inputs(model, size=(4, 3, 8, 8))
    sites, _ = _sites(model, inputs)
    attn = [s for s in sites if s.op == "attn"]
    assert [(s.frames, s.hw, s.start, s.tokens) for s in attn] == [(3, (4, 4), 0, 48)]
    with pytest.raises(ValueError, match="frames x an h x w grid"):
        tome_fx.optimize(model, method="tomesd", ratio=0.5, example_inputs=inputs)


class _Patchy(torch.nn.Module):
    """A DiT block on 2x2 patches cut from the latent by a reshape (as Lumina-Next cuts them),
    with no rotary embedding: its tokens are the 8 x 8 grid of patches of a 16 x 16 latent."""

    def __init__(self, c=4, p=2, d=32):
        super().__init__()
        self.p = p
        self.embed, self.norm = torch.nn.Linear(c * p * p, d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.out = torch.nn.Linear(d, c * p * p)

    def patches(self, sample):
        b, c, h, w = sample.shape
        p = self.p
        x = sample.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return self.embed(x.flatten(3).flatten(1, 2))

    def attend(self, y):
        q, k, v = self.qkv(y).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        return self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v)
                         .transpose(1, 2).flatten(2))

    def forward(self, sample, timestep):
        x = self.patches(sample)
        x = x + self.attend(self.norm(x))
        return self.out(x)


def test_patches_cut_by_reshape():
    """The grid of a latent patchified by a reshape is its h/p x w/p patches: ToMeSD merges on
    it, equal to the kernels applied by hand on the 8 x 8 grid."""
    from tome_fx.kernels.tomesd import tomesd_match, tomesd_merge, tomesd_unmerge
    torch.manual_seed(0)
    model = _Patchy().eval()
    inputs = {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor([1.0, 2.0])}
    rw = _rewrite(model, inputs, ratio=0.5)
    assert [lv.grid for lv in rw.plan.levels] == [(8, 8)]
    with torch.no_grad():
        x = model.patches(inputs["sample"])
        match = tomesd_match(x, 8, 8, 2, 2, 0.5)
        ref = model.out(x + tomesd_unmerge(model.attend(tomesd_merge(model.norm(x), match)),
                                           match))
        assert relative(rw.graph_module(**inputs), ref) <= 1e-6
