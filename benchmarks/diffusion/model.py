"""The CIFAR-10 diffusion model tome_fx trains for its image-quality numbers.

A class-conditional diffusers ``UNet2DConditionModel`` in Stable Diffusion's layout: cross-attention
transformer blocks at the two finer levels and the middle, plain ResNet blocks at the coarsest,
the condition a token in ``encoder_hidden_states`` (here one learned embedding per class, index 10
the empty class for classifier-free guidance, where SD has a text encoder). SD runs on a VAE's
latent; here the "autoencoder" is lossless: a 32x32 RGB image is a 12x16x16 latent by a 2x2
space-to-depth (``pixel_unshuffle``), so the finest transformer level has 256 tokens on a 16x16
grid, as SD's has 4096 on 64x64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 10
NULL = CLASSES  # the empty condition of classifier-free guidance
UNET = dict(
    sample_size=16, in_channels=12, out_channels=12, layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(24, 48, 48), transformer_layers_per_block=(4, 2, 1), norm_num_groups=8,
    cross_attention_dim=64, attention_head_dim=2,
)
# Narrow and deep in transformers (as SDXL: several transformer layers per block) so the
# transformers are most of the FLOPs, as in SD at 64x64, and a FLOP ratio of 0.7 is reachable by
# merging; 1.1 M parameters so it trains in hours and samples thousands of images on 2 CPU cores.
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                prediction_type="epsilon", clip_sample=False)


class ClassUNet(nn.Module):
    """``unet`` (what tome_fx and the authors' packages rewrite) and the class embeddings."""

    def __init__(self):
        super().__init__()
        from diffusers import UNet2DConditionModel
        self.unet = UNet2DConditionModel(**UNET)
        self.classes = nn.Embedding(CLASSES + 1, UNET["cross_attention_dim"])

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """``[B]`` class indices -> ``[B, 1, D]`` encoder hidden states."""
        return self.classes(labels)[:, None]

    def forward(self, latent, t, labels):
        return self.unet(latent, t, encoder_hidden_states=self.condition(labels)).sample


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 32, 32]`` in [-1, 1] -> ``[B, 12, 16, 16]``."""
    return F.pixel_unshuffle(images, 2)


def to_images(latent: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(latent, 2)


def load(path) -> ClassUNet:
    """The model with the weights of ``path`` (safetensors), in eval mode."""
    from safetensors.torch import load_file
    model = ClassUNet()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def scheduler(kind: str = "ddim"):
    """The training (``ddpm``) or sampling (``ddim``) scheduler of the model's noise schedule.
    DDIM starts at t = 999 ("trailing" steps: with "leading" ones a cosine schedule's first step
    is t = 950, where pure noise is the wrong input) and clips its estimate of the image."""
    from diffusers import DDIMScheduler, DDPMScheduler
    if kind == "ddim":
        return DDIMScheduler(**{**SCHEDULE, "clip_sample": True, "timestep_spacing": "trailing"})
    return DDPMScheduler(**SCHEDULE)


@torch.no_grad()
def sample(unet, condition, null, noise, steps: int = 20, guidance: float = 6.0):
    """DDIM (eta 0) from ``noise`` ``[B, 12, 16, 16]`` with classifier-free guidance: ``unet`` is
    called as SD's pipelines call it, the conditional and empty halves in one batch; returns
    images in [-1, 1]."""
    sched = scheduler("ddim")
    sched.set_timesteps(steps)
    x = noise
    context = torch.cat([condition, null.expand_as(condition)])
    for t in sched.timesteps:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
        cond, empty = eps.chunk(2)
        x = sched.step(empty + guidance * (cond - empty), t, x).prev_sample
    return to_images(x).clamp(-1, 1)
