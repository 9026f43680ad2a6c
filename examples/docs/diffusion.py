import torch, tome_fx
from diffusers import UNet2DConditionModel

# A small SD1.5-shaped UNet with random weights; a pipeline's unet is used the same way:
# pipe.unet = tome_fx.optimize(pipe.unet, method="tomesd", ratio=0.5)
unet = UNet2DConditionModel(
    sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2).eval()

fast = tome_fx.optimize(unet, method="tomesd", ratio=0.5)  # or method="todo"
print(fast.tome)                           # per op: tokens, r; per level: grid, ratio, FLOPs
latents, text = torch.randn(2, 4, 24, 16), torch.randn(2, 77, 32)
with torch.no_grad():                      # called as the pipeline calls its UNet, any size
    noise = fast(latents, 999, encoder_hidden_states=text).sample
