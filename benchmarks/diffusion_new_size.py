"""What a new latent size costs a ToMeSD module (``optimize(method="tomesd")`` on a diffusers
UNet): the time of ``optimize`` itself, of the first call at a size the first graph's guards
take (no capture), and of the first call at a size they refuse (captured once, then cached),
each beside a plain call of the model at that size. Random weights, SD1.5's UNet config (or
``--tiny``: the test suite's small SD1.5-shaped UNet).

    PYTHONPATH=. taskset -c 1 python benchmarks/diffusion_new_size.py --threads 1 \
        --out benchmarks/results/diffusion_new_size.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import torch


def unet(tiny: bool):
    import diffusers

    torch.manual_seed(0)
    if tiny:
        return diffusers.UNet2DConditionModel(
            sample_size=16, layers_per_block=1, block_out_channels=(32, 64, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32).eval()
    return diffusers.UNet2DConditionModel(  # SD1.5's config (runwayml/stable-diffusion-v1-5)
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        cross_attention_dim=768, attention_head_dim=8).eval()


def timed(fn):
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--latent", type=int, default=32, help="side of the latent optimize sees")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import tome_fx

    model = unet(a.tiny)
    text = model.config.cross_attention_dim
    side = a.latent

    def inputs(h, w):
        return (torch.randn(2, 4, h, w), torch.tensor(500.0), torch.randn(2, 77, text))

    rows = {}
    start = time.perf_counter()
    fast = tome_fx.optimize(model, method="tomesd", ratio=0.5, use_rand=False,
                            example_inputs=inputs(side, side))
    rows["optimize"] = time.perf_counter() - start
    for name, (h, w) in (("same_class", (side + 8, side)), ("new_class", (side + 3, side - 3))):
        x = inputs(h, w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows[f"{name}_first_call"] = timed(lambda: fast(*x))
        rows[f"{name}_second_call"] = timed(lambda: fast(*x))
        rows[f"{name}_model_call"] = timed(lambda: model(*x))
        rows[f"{name}_size"] = [h, w]
    result = {"model": "tiny SD1.5-shaped UNet" if a.tiny else "SD1.5 UNet config, random weights",
              "parameters": sum(p.numel() for p in model.parameters()),
              "optimized_at": [side, side], "batch": 2, "threads": a.threads,
              "graphs_cached": len(fast.graphs), "seconds": rows,
              "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
