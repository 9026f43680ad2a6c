"""Merge tokens in a timm ViT and compare it with the original.

    python examples/quickstart.py
"""
import time

import timm
import torch

import tome_fx

model = timm.create_model("vit_small_patch16_224").eval()  # random weights: nothing downloaded
x = torch.randn(8, 3, 224, 224)

fast = tome_fx.optimize(model, r=8, example_inputs=(x[:2],))
print(fast.tome)  # per-block plan: tokens in, r, tokens out

with torch.no_grad():
    for name, m in [("original", model), ("tome_fx r=8", fast)]:
        m(x)  # warm-up
        t = time.perf_counter()
        y = m(x)
        print(f"{name:12s} {len(x) / (time.perf_counter() - t):7.1f} img/s")
