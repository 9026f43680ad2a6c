"""Fine-tune the trained CIFAR-10 ViT (../shared) with token merging active, through the rewritten graph.

    python examples/finetune_cifar10.py                # writes benchmarks/results/cifar10_finetune.*

1. ``tome_fx.optimize(model, flops_budget=0.5, example_inputs=calib)`` (calibration: training
   images) gives a GraphModule; it is trained directly (``.train()``, AdamW, light augmentation:
   random crop with 4-pixel zero padding + horizontal flip).
2. Training throughput with and without merging on the *same* batches in the same run: the first
   ``--speed-steps`` batches are each used for one timed step of three separately-optimised
   copies: the merged module, the unmerged tome_fx module (r = 0: the same traced graph without
   merging) and the original nn.Module. Then the merged module trains on.
3. Test accuracy (full test set) of the fine-tuned merged module vs the off-the-shelf merged
   module (original weights, same schedule); also the fine-tuned weights without merging.

Dropout: the traced graph keeps dropout *modules* (they follow ``.train()``), but the attention-
probability dropout inside nn.MultiheadAttention is fixed at p=0 because tracing happens in eval
mode. The unmerged r=0 module has the same property, so the speed comparison is like for like.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tome_fx first
import cifar_vit as cv  # noqa: E402
from eval_cifar10 import RESULTS, update_section  # noqa: E402

import tome_fx  # noqa: E402


def augment(u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4, zero = black before normalisation) + horizontal flip; uint8 NHWC in."""
    b = u8.shape[0]
    x = u8.permute(0, 3, 1, 2)
    x = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (b,), generator=gen)
    j = torch.randint(0, 9, (b,), generator=gen)
    rows = (i[:, None] + torch.arange(32))[:, None, :, None].expand(b, 3, 32, 40)
    x = x.gather(2, rows)
    cols = (j[:, None] + torch.arange(32))[:, None, None, :].expand(b, 3, 32, 32)
    x = x.gather(3, cols)
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return cv.normalize(x.permute(0, 2, 3, 1))


def _step(module, opt, sched, x, y) -> float:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return loss.item()


def _optimizer(module, lr, wd, steps, warmup):
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=wd)
    f = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, f)


def _accuracy(module, x, y, label) -> float:
    module.eval()
    bar = tqdm(total=(len(x) + 499) // 500, leave=False, desc=label)
    pred = cv.predict(module, x, 500, bar)
    bar.close()
    return float((pred == y).float().mean()) * 100


def run(args) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    model = cv.load_model()
    n_train = args.steps * args.batch
    order = torch.randperm(50000, generator=gen)[:n_train].numpy()
    train_u8, train_y = cv.load_train_uint8(order, progress=True)  # decoded once, in memory
    calib_u8, _ = cv.load_train_uint8(cv.calibration_indices(args.calib))
    calib = (cv.normalize(calib_u8),)
    test_x, test_y = cv.load_test(args.limit)

    merged = tome_fx.optimize(model, flops_budget=args.budget, example_inputs=calib)
    schedule = list(merged.tome.r)
    off_shelf = copy.deepcopy(merged)  # original weights, same schedule, never trained
    unmerged = tome_fx.optimize(model, r=0, example_inputs=calib)
    original = copy.deepcopy(model)

    # gradients reach every parameter through the merges
    merged.train()
    F.cross_entropy(merged(augment(train_u8[:8], gen)), train_y[:8]).backward()
    no_grad = [n for n, p in merged.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    merged.zero_grad(set_to_none=True)

    opt, sched = _optimizer(merged, args.lr, args.wd, args.steps, args.warmup)
    others = {name: (m.train(), *_optimizer(m, args.lr, args.wd, args.steps, args.warmup))
              for name, m in (("unmerged (tome_fx r=0)", unmerged), ("original nn.Module", original))}
    times = {"merged": [], **{k: [] for k in others}}
    losses = []
    bar = tqdm(total=args.steps, leave=False, desc=f"fine-tune b={args.budget}")
    for s in range(args.steps):
        sl = slice(s * args.batch, (s + 1) * args.batch)
        x, y = augment(train_u8[sl], gen), train_y[sl]
        if s < args.speed_steps:  # same batch through each model, timed
            for name, (m, o, sc) in others.items():
                t = time.perf_counter()
                _step(m, o, sc, x, y)
                times[name].append(time.perf_counter() - t)
        merged.train()
        t = time.perf_counter()
        losses.append(_step(merged, opt, sched, x, y))
        if s < args.speed_steps:
            times["merged"].append(time.perf_counter() - t)
        bar.update(1)
    bar.close()
    del others

    def ips(ts):  # median step, first step (warm-up) excluded
        ts = sorted(ts[1:] or ts)
        return args.batch / ts[len(ts) // 2]

    speed = {k: ips(v) for k, v in times.items()}
    tuned_plain = tome_fx.optimize(model, r=0, example_inputs=calib)
    tuned_plain.load_state_dict(merged.state_dict())
    acc = {
        "original (no merging)": _accuracy(model, test_x, test_y, "original"),
        f"off-the-shelf merged b={args.budget}": _accuracy(off_shelf, test_x, test_y, "off-the-shelf merged"),
        f"fine-tuned merged b={args.budget}": _accuracy(merged, test_x, test_y, "fine-tuned merged"),
        "fine-tuned, evaluated without merging": _accuracy(tuned_plain, test_x, test_y, "fine-tuned unmerged"),
    }
    return dict(
        budget=args.budget, schedule=schedule, ratio=merged.tome.ratio, steps=args.steps,
        batch=args.batch, train_images=n_train, epochs=n_train / 50000, lr=args.lr, wd=args.wd,
        warmup=args.warmup, seed=args.seed, threads=torch.get_num_threads(),
        test_images=len(test_x), params_without_grad=no_grad,
        loss_first=sum(losses[:10]) / len(losses[:10]), loss_last=sum(losses[-10:]) / len(losses[-10:]),
        train_images_per_s=speed, speed_steps=args.speed_steps, accuracy=acc,
        command=" ".join(["python", "examples/finetune_cifar10.py", *sys.argv[1:]]),
    )


def table(r: dict) -> str:
    base = r["train_images_per_s"]["unmerged (tome_fx r=0)"]
    lines = ["| training step (same batches) | images/s | vs unmerged |", "|---|---|---|"]
    for k, v in r["train_images_per_s"].items():
        name = f"merged b={r['budget']} (tome_fx)" if k == "merged" else k
        lines.append(f"| {name} | {v:.0f} | {v / base:.2f}x |")
    lines += ["", "| model | test top-1 % |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["accuracy"].items()]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=390, help="optimiser steps (390 x 128 ~ 1 epoch)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--speed-steps", type=int, default=12, help="steps timed for all three models")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="first N test images (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--eval-md", type=Path, default=None)
    args = p.parse_args(argv)
    if not cv.available():
        sys.exit(f"finetune_cifar10: {cv.missing_reason()}")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cifar10_finetune.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (args.out / "cifar10_finetune.md").write_text(md + "\n")
    if args.eval_md:
        note = (f"Command: `{result['command']}` ({result['steps']} steps x {result['batch']} = "
                f"{result['epochs']:.2f} epochs, AdamW lr {result['lr']:g} wd {result['wd']:g}, "
                f"schedule r = {result['schedule']} (FLOP ratio {result['ratio']:.3f}), "
                f"{result['test_images']} test images, {result['threads']} threads; throughput: "
                f"median of {result['speed_steps'] - 1} timed steps on the same batches).")
        update_section(args.eval_md, "cifar10_finetune", note + "\n\n" + md)
    print(md)
    return result


if __name__ == "__main__":
    main()
