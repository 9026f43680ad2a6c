"""A ToMeSD module swapped into a diffusers pipeline behaves as the model it replaces: any latent
size and batch from one ``optimize``, optional inputs first seen at call time, state changes of
the model (FreeU, processors, dtype) reaching the graphs, the model's own weights. Small
random-weight components, built here; references are the authors' ``tomesd`` patch or their
merge through hooks (``diffusion_models``)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from diffusion_models import HookedToMeSD, pixart, relative, sd15, sdxl

diffusers = pytest.importorskip("diffusers")
tomesd = pytest.importorskip("tomesd")

import tome_fx  # noqa: E402


def _patched(model, **options):
    ref = copy.deepcopy(model)
    tomesd.apply_patch(ref, ratio=0.5, use_rand=False, **options)
    return ref


def _storages(module) -> set[int]:
    return {p.data_ptr() for p in module.parameters()}


@pytest.mark.parametrize("shape", ["sd15", "sdxl"])
def test_any_latent_size_and_batch(shape):
    """One optimize, then three other latent sizes (non-square; odd sides, which neither the
    merge windows nor the UNet's 8x downsampling divide; larger) at batches 1, 3, 4: each equals
    the authors' patch at that size. Sizes the first graph's guards take reuse it; the odd one
    is captured once, with a warning, and reused."""
    model = sd15() if shape == "sd15" else sdxl()
    fast = tome_fx.optimize(model, method="tomesd", ratio=0.5, use_rand=False)
    side = model.config.sample_size
    ref = _patched(model, **({} if shape == "sd15" else {"max_downsample": 2}))
    assert _storages(fast.graph) <= _storages(model)  # the model's own weights
    odd = (17, 13) if shape == "sd15" else (34, 26)  # sdxl merges at 2x: a 17x13 grid
    captures = []
    for (h, w), batch in (((side + 8, side), 1), (odd, 3), ((side + 16, side + 16), 4), (odd, 1)):
        inputs = {"sample": torch.randn(batch, 4, h, w), "timestep": torch.tensor(500.0),
                  "encoder_hidden_states": torch.randn(batch, 77, 32)}
        if shape == "sdxl":
            inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32),
                                           "time_ids": torch.randn(batch, 6)}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                ours = fast(**inputs, return_dict=False)[0]
        new = [str(c.message) for c in caught if "captured" in str(c.message)]
        assert len(new) == ((h, w, batch) == (*odd, 3))  # the odd size is captured once
        captures += new
        with torch.no_grad():
            theirs = ref(inputs.pop("sample"), **inputs).sample
        assert ours.shape == (batch, 4, h, w)
        assert relative(ours, theirs) <= 1e-4
    assert len(fast.graphs) == 2
    assert f"sample (3, 4, {odd[0]}, {odd[1]})" in captures[0]


def _vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(32,), down_block_types=(
        "DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), latent_channels=4,
        norm_num_groups=32).eval()  # scale factor 1: image size = latent size


TEXT = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
EMPTY = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
SIZES = ((16, 16), (24, 16))


def _images(pipe, height, width, **extra):
    return pipe(prompt_embeds=TEXT, negative_prompt_embeds=EMPTY, num_inference_steps=2,
                height=height, width=width, output_type="pt",
                generator=torch.Generator().manual_seed(0), **extra).images


def test_stable_diffusion_pipeline_freeu_and_sizes():
    """``pipe.unet = optimize(pipe.unet)`` with nothing else given, then ``pipe.enable_freeu``:
    images at two sizes equal the authors' patched pipeline with FreeU; FreeU changes them (it
    reaches the graphs), and ``disable_freeu`` takes it away again."""
    unet = sd15()
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(), text_encoder=None, tokenizer=None, unet=unet,
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.unet = tome_fx.optimize(unet, method="tomesd", ratio=0.5, use_rand=False)
    plain = _images(pipe, *SIZES[0])
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    ours = [_images(pipe, h, w) for h, w in SIZES]
    assert relative(ours[0], plain) > 1e-3  # FreeU reached the graphs
    pipe.unet = unet  # the same model, FreeU on: the authors' patch of it
    tomesd.apply_patch(pipe, ratio=0.5, use_rand=False)
    for (h, w), image in zip(SIZES, ours):
        assert image.shape[-2:] == (h, w)
        assert relative(image, _images(pipe, h, w)) <= 1e-4


def test_controlnet_pipeline():
    """ControlNet's residuals reach the UNet only at call time: captured for that signature.
    Equal to the authors' patched UNet in the same pipeline, at two sizes."""
    unet = sd15()
    torch.manual_seed(0)
    control = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,))
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=_vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=control.eval(),
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.unet = tome_fx.optimize(unet, method="tomesd", ratio=0.5, use_rand=False)
    conds = [torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(3)) for h, w in SIZES]
    with pytest.warns(UserWarning, match="captured UNet2DConditionModel again"):
        ours = [_images(pipe, h, w, image=c) for (h, w), c in zip(SIZES, conds)]
    pipe.unet = unet
    tomesd.apply_patch(pipe, ratio=0.5, use_rand=False)
    for (h, w), c, image in zip(SIZES, conds, ours):
        assert relative(image, _images(pipe, h, w, image=c)) <= 1e-4


def test_pixart_pipeline():
    """PixArt-alpha calls its transformer with a text mask and ``added_cond_kwargs``, neither in
    the default example inputs: equal to the authors' merge (through hooks) in the same
    pipeline at two sizes."""
    transformer = pixart()
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_vae(),
                                         transformer=transformer,
                                         scheduler=diffusers.DDIMScheduler())
    mask = torch.ones(1, 77, dtype=torch.long)

    def images(height, width):
        return pipe(prompt_embeds=TEXT, prompt_attention_mask=mask, negative_prompt=None,
                    negative_prompt_embeds=EMPTY,
                    negative_prompt_attention_mask=mask, num_inference_steps=2, height=height,
                    width=width, output_type="pt", use_resolution_binning=False,
                    generator=torch.Generator().manual_seed(0)).images

    pipe.transformer = tome_fx.optimize(transformer, method="tomesd", ratio=0.5, use_rand=False)
    ours = [images(h, w) for h, w in SIZES]
    size = {}
    hooked = HookedToMeSD(copy.deepcopy(transformer), 0.5, lambda n: size["grid"])
    pipe.transformer = hooked.model
    for (h, w), image in zip(SIZES, ours):
        size["grid"] = (h // 2, w // 2)  # patch size 2
        assert relative(image, images(h, w)) <= 1e-4


def test_lora_scale_through_cross_attention_kwargs():
    """A LoRA adapter (peft) scaled per call with ``cross_attention_kwargs={"scale": s}``: each
    scale is its own signature, equal to the authors' patch at that scale."""
    peft = pytest.importorskip("peft")
    unet = sd15()
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    fast = tome_fx.optimize(unet, method="tomesd", ratio=0.5, use_rand=False)
    ref = _patched(unet)
    x, e = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    outs = {}
    for scale in (0.0, 0.5):
        with torch.no_grad():
            outs[scale] = fast(x, 500, e, cross_attention_kwargs={"scale": scale}).sample
            theirs = ref(x, 500, e, cross_attention_kwargs={"scale": scale}).sample
        assert relative(outs[scale], theirs) <= 1e-4
    assert relative(outs[0.0], outs[0.5]) > 1e-3  # the scale reaches the graph


def test_state_changes_reach_the_graph():
    """``set_attn_processor``, ``.to(torch.bfloat16)`` after optimizing in fp32, and an attribute
    set on a submodule of the model directly: each drops the cached graphs, and the next call
    computes what the changed model computes with the authors' patch."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = sd15()
    fast = tome_fx.optimize(unet, method="tomesd", ratio=0.5, use_rand=False)
    x, e = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    torch.compile(unet)  # compiling the original (to compare) marks it, changes nothing
    assert len(fast.graphs) == 1
    fast(x, 500, e)
    assert len(fast.graphs) == 1  # no capture again
    fast.set_attn_processor(AttnProcessor())  # the classic (non-SDPA) processor
    assert not fast.graphs
    assert type(unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn1."
                                     "processor"]).__name__ == "AttnProcessor"
    unet.up_blocks[1].resnets[0].output_scale_factor = 2.0  # straight on the model
    with torch.no_grad():
        ours = fast(x, 500, e).sample
        assert relative(ours, _patched(unet)(x, 500, e).sample) <= 1e-4
    fast.to(torch.bfloat16)
    assert fast.dtype == torch.bfloat16 and unet.dtype == torch.bfloat16
    with torch.no_grad():
        low = fast(x.bfloat16(), 500, e.bfloat16()).sample
    assert low.dtype == torch.bfloat16
    assert relative(low.float(), ours) <= 0.05


def test_scalar_timestep_in_example_inputs_and_call_errors():
    """A 0-d timestep in ``example_inputs`` (as pipelines pass it) is one per sample; a call the
    model cannot take is the model's one-line TypeError."""
    unet = sd15()
    x, e = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    fast = tome_fx.optimize(unet, method="tomesd", ratio=0.5, use_rand=False,
                            example_inputs=(x, torch.tensor(500), e))
    with torch.no_grad():
        assert relative(fast(x, 500, e).sample, _patched(unet)(x, 500, e).sample) <= 1e-4
    with pytest.raises(TypeError, match="UNet2DConditionModel.forward: .*unexpected"):
        fast(x, 500, e, colour="red")


def test_svd_unet_with_its_pipeline_call():
    """SVD's UNet optimized with no example inputs, then called as
    ``StableVideoDiffusionPipeline`` calls it (the latent positional, a 0-d timestep, image
    embeddings and ``added_time_ids`` as keywords, ``return_dict=False``) at two latent sizes:
    equal to the authors' merge on every spatial block (through hooks; the temporal blocks are
    never merged), at the finest two levels."""
    from diffusion_models import svd

    unet = svd()
    fast = tome_fx.optimize(unet, method="tomesd", ratio=0.5, use_rand=False, max_downsample=2)
    size = {}

    def grid(tokens):
        h, w = size["latent"]
        return (h, w) if tokens == h * w else (h // 2, w // 2)

    hooked = HookedToMeSD(copy.deepcopy(unet), 0.5, grid, blocks=("BasicTransformerBlock",))
    frames = unet.config.num_frames
    for h, w in ((8, 8), (16, 8)):
        size["latent"] = (h, w)
        latent = torch.randn(2, frames, 8, h, w)
        kwargs = {"encoder_hidden_states": torch.randn(2, 1, 32),
                  "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * 2)}
        with torch.no_grad():
            ours = fast(latent, torch.tensor(0.7), return_dict=False, **kwargs)[0]
            theirs = hooked.model(latent, torch.tensor(0.7), **kwargs).sample
        assert ours.shape == (2, frames, 4, h, w)
        assert relative(ours, theirs) <= 1e-4
    assert all("temporal" not in row.site for row in fast.tome.blocks if row.r > 0)
