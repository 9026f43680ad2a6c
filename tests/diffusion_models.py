"""Small diffusers models with the structure of the real ones (random weights, shrunk channels
and layers), and a reference ToMeSD on the transformer blocks written with the authors' own merge
function (``tomesd.merge.bipartite_soft_matching_random2d``) through forward hooks, for the
models the authors' patch does not reach (DiT and SD3 blocks in current diffusers)."""
from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
tomesd = pytest.importorskip("tomesd")


def sd15(size=16):
    """SD1.5's UNet shape: 4 levels (the last without attention), cross-attention to text."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 3
        + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32).eval()


def sdxl(size=32, layers=(1, 2, 3)):
    """SDXL's UNet shape: no attention at the first level, several transformer layers per block
    after it, linear projections, text-and-time added conditioning."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, transformer_layers_per_block=layers, attention_head_dim=2,
        norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8).eval()


def dit(size=16, layers=2):
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=size, patch_size=2, num_embeds_ada_norm=1000,
        norm_num_groups=32).eval()


def pixart(size=16, layers=2):
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=layers, cross_attention_dim=32, sample_size=size, patch_size=2,
        caption_channels=32, norm_num_groups=32, num_embeds_ada_norm=1000).eval()


def sd3(size=16, layers=2):
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=size, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=32).eval()


def call(model, inputs, first_positional=False):
    """``model`` on inputs as ``example_inputs`` takes them (the authors' patch reads the image
    size from the first positional input: ``first_positional``); the output's sample."""
    if first_positional:
        first, *rest = inputs.items()
        model = (lambda m: lambda **kw: m(first[1], **kw))(model)
        inputs = dict(rest)
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out.sample if hasattr(out, "sample") else out[0]


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


class HookedToMeSD:
    """ToMeSD on every transformer block of a diffusers model, as the authors define it: the match
    from the block's input (``bipartite_soft_matching_random2d``, top-left destinations), each op
    of ``ops`` (``attn1``/``attn`` the self-attention, image tokens only in joint attention;
    ``attn2`` the cross-attention; ``ff`` the MLP) run on merged tokens and unmerged.
    ``grid(tokens) -> (h, w)`` gives the block's token grid."""

    def __init__(self, model, ratio, grid, ops=("attn1", "attn"),
                 blocks=("BasicTransformerBlock", "JointTransformerBlock")):
        self.model, self.handles, self.ratio, self.grid = model, [], ratio, grid
        for m in model.modules():
            if type(m).__name__ in blocks:
                self.handles.append(m.register_forward_pre_hook(self._match, with_kwargs=True))
                for name in ops:
                    op = getattr(m, name, None)
                    if op is not None:
                        self.handles.append(op.register_forward_pre_hook(self._merge,
                                                                         with_kwargs=True))
                        self.handles.append(op.register_forward_hook(self._unmerge))
        self.fns = None

    def _match(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        h, w = self.grid(x.shape[1])
        self.fns = tomesd.merge.bipartite_soft_matching_random2d(
            x, w, h, 2, 2, int(x.shape[1] * self.ratio), no_rand=True)

    def _merge(self, module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        return (self.fns[0](x), *args[1:]), kwargs

    def _unmerge(self, module, args, out):
        if isinstance(out, tuple):  # joint attention: (image, text); text passes unchanged
            return (self.fns[1](out[0]), *out[1:])
        return self.fns[1](out)


def square(tokens):
    side = int(math.isqrt(tokens))
    return side, side


# ---------------------------------------------------------------------------------------------
# the zoo of tests/test_diffusion_zoo.py: every diffusers model ToMeSD merges or refuses, tiny
# ---------------------------------------------------------------------------------------------

def svd(size=4, frames=16):
    """SVD's UNet: spatial transformer blocks on [B*F, C, h, w], temporal ones over the frames
    (16 frames and a 4x4 grid: as many frames as grid cells)."""
    torch.manual_seed(0)
    return diffusers.UNetSpatioTemporalConditionModel(
        sample_size=size, in_channels=8, out_channels=4, block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlockSpatioTemporal",),
        up_block_types=("CrossAttnUpBlockSpatioTemporal",), addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24, layers_per_block=1, cross_attention_dim=32,
        num_attention_heads=(2,), num_frames=frames).eval()


def motion(size=4):
    """AnimateDiff's UNetMotionModel: SD1.5's UNet with motion modules over the frames (16 by
    default, as many as the 4x4 grid's cells)."""
    torch.manual_seed(0)
    return diffusers.UNetMotionModel(
        sample_size=size, block_out_channels=(32,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockMotion",), up_block_types=("CrossAttnUpBlockMotion",),
        cross_attention_dim=32, num_attention_heads=2, motion_num_attention_heads=2,
        motion_max_seq_length=32, norm_num_groups=32).eval()


def controlnet():
    """SD1.5's ControlNet: its conditioning image is 8x the latent's side."""
    torch.manual_seed(0)
    model = diffusers.ControlNetModel(
        in_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=32,
        conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
    with torch.no_grad():  # its zero convolutions, as after training: the outputs are not 0
        for p in [*model.controlnet_down_blocks.parameters(),
                  *model.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.1)
    return model


def flux(layers=1):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()


def cogvideox(layers=1):
    torch.manual_seed(0)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=16, text_embed_dim=32, num_layers=layers, sample_width=8, sample_height=8,
        sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8).eval()


def wan(layers=1):
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=layers,
        rope_max_seq_len=32).eval()


def lumina_next(size=16, layers=1):
    torch.manual_seed(0)
    return diffusers.LuminaNextDiT2DModel(
        sample_size=size, patch_size=2, in_channels=4, hidden_size=32, num_layers=layers,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, cross_attention_dim=32).eval()


def lumina2(size=16, layers=1):
    torch.manual_seed(0)
    return diffusers.Lumina2Transformer2DModel(
        sample_size=size, patch_size=2, in_channels=4, hidden_size=32, num_layers=layers,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
        axes_dim_rope=(4, 6, 6), axes_lens=(128, 32, 32), cap_feat_dim=32).eval()


def hunyuan(size=16, layers=2):
    torch.manual_seed(0)
    return diffusers.HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2,
        sample_size=size, hidden_size=32, num_layers=layers, cross_attention_dim=32,
        cross_attention_dim_t5=32, pooled_projection_dim=16, text_len=8, text_len_t5=8).eval()


def flux_inputs(h: int, w: int, batch: int = 2, text: int = 8, seed: int = 0) -> dict:
    """Inputs of ``flux()`` for an ``h x w`` grid of packed tokens, ``img_ids`` row-major as
    FluxPipeline's ``_prepare_latent_image_ids`` builds them."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    return {"hidden_states": torch.randn(batch, h * w, 16, generator=g),
            "timestep": torch.full((batch,), 0.5),
            "encoder_hidden_states": torch.randn(batch, text, 32, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g),
            "img_ids": ids, "txt_ids": torch.zeros(text, 3)}


def tiny_vae():
    """An AutoencoderKL of one level: scale factor 1, so the image is the latent's size."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(32,), down_block_types=(
        "DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), latent_channels=4,
        norm_num_groups=32, shift_factor=0.0).eval()


def flux_images(model, sizes, text: int = 8, steps: int = 2, fast=None) -> list:
    """A FluxPipeline of small components around ``model`` (text embeddings given: no
    tokenizer offline), ``pipe.transformer = fast`` if given; its images at each (height,
    width) of ``sizes``, from fixed seeds."""
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model)
    if fast is not None:
        pipe.transformer = fast
    prompt = torch.randn(1, text, 32, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(1, 16, generator=torch.Generator().manual_seed(2))
    return [pipe(prompt_embeds=prompt, pooled_prompt_embeds=pooled, height=h, width=w,
                 num_inference_steps=steps, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images for h, w in sizes]
