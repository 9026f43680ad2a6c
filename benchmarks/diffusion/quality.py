"""Image quality of token merging on a trained diffusion model: every row of ``rows.py`` samples
the same classes from the same noise (DDIM, eta 0, classifier-free guidance) and is compared with
the unmerged model's images (paired) and with the CIFAR-10 test set (distribution).

    taskset -c 0 python benchmarks/diffusion/quality.py sample --part 0/2 &
    taskset -c 1 python benchmarks/diffusion/quality.py sample --part 1/2
    python benchmarks/diffusion/quality.py report

``sample`` writes each row's images (uint8), CPU seconds and counted FLOPs to ``--work`` (a row
already there is skipped, so a stopped run resumes); ``report`` reads them and writes
``diffusion_quality.json``, ``.md``, ``_grid.png`` and ``.png`` to ``--out``. Metrics: PSNR and
SSIM (torchmetrics) of each image to the unmerged one from the same noise; how often the shared
CIFAR-10 ViT gives both the same class; the share of images the ViT gives their conditioning
class; the Frechet distance of the ViT's pre-head features (the class token into its head, 128-D)
to those of the 10,000 test images — FID's formula in that ViT's feature space, NOT Inception FID,
so not comparable with published FIDs; 95% percentile-bootstrap intervals over images
(scipy.stats.bootstrap). The FLOP ratio is counted (``tests/flops.py``) over one whole sampling
trajectory (every step, the guidance batch of 2), so ToDo's two branches are weighted by steps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "tests"), str(ROOT / "examples")]
import model as M  # noqa: E402
from rows import build, rows  # noqa: E402


def arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["sample", "report"])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--part", default="0/1", help="i/n: sample every n-th row from the i-th")
    p.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    p.add_argument("--weights", type=Path, default=HERE / "cifar_unet.safetensors")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "quality")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def noise_and_labels(n: int, seed: int):
    """Image ``i``: class ``i % 10``, noise from its own generator (independent of batching)."""
    shape = (M.UNET["in_channels"], M.UNET["sample_size"], M.UNET["sample_size"])
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                         for i in range(n)])
    return noise, torch.arange(n) % M.CLASSES


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def trajectory_flops(row, net, seed: int, steps: int, guidance: float) -> int:
    """Counted FLOPs of one image's trajectory (batch 2 with guidance), on the row built for
    that batch and run once before counting (tome_fx builds a graph at a call's first shape and
    branch: that work is not the model's)."""
    from flops import counted_flops
    fn = build(row, net, seed, batch=2)
    noise, labels = noise_and_labels(1, 12345)
    with torch.no_grad():
        cond, null = net.condition(labels), net.condition(torch.tensor([M.NULL]))
    M.sample(fn, cond, null, noise, steps, guidance)
    return counted_flops(M.sample, fn, cond, null, noise, steps, guidance)


def sample_rows(args):
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    net = M.load(args.weights)
    noise, labels = noise_and_labels(args.images, args.seed)
    with torch.no_grad():
        cond, null = net.condition(labels), net.condition(torch.tensor([M.NULL]))
    i, n = (int(x) for x in args.part.split("/"))
    chosen = rows()[i::n]
    if args.rows:
        names = args.rows.split(",")
        chosen = [r for r in rows() if r.name in names]
    args.work.mkdir(parents=True, exist_ok=True)
    for row in chosen:
        path = args.work / f"{row.slug}.pt"
        if path.exists():
            continue
        flops = trajectory_flops(row, net, args.seed, args.steps, args.guidance)
        fn = build(row, net, args.seed, batch=2 * args.batch)
        # one batch first, so the graphs of every step's branch (ToDo's switch) are built
        M.sample(fn, cond[:args.batch], null, noise[:args.batch], args.steps, args.guidance)
        out, cpu = [], 0.0
        for b in range(0, args.images, args.batch):
            torch.manual_seed(args.seed + b)  # the authors' random destinations
            t0 = time.process_time()
            images = M.sample(fn, cond[b:b + args.batch], null, noise[b:b + args.batch],
                              args.steps, args.guidance)
            cpu += time.process_time() - t0
            out.append(to_uint8(images))
            print(f"{row.name}: {b + len(images)}/{args.images}", flush=True)
        torch.save({"images": torch.cat(out), "labels": labels, "cpu_s": cpu, "flops": int(flops),
                    "row": row.name, "steps": args.steps, "guidance": args.guidance,
                    "threads": args.threads}, path)


def main(argv=None):
    args = arguments(argv)
    if args.stage == "sample":
        sample_rows(args)
    else:
        from report import report
        report(args)


if __name__ == "__main__":
    main()
