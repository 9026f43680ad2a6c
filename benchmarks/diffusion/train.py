"""Train the CIFAR-10 diffusion model of ``model.py`` (resumable, deterministic).

    taskset -c 1 python benchmarks/diffusion/train.py

Epsilon prediction on the 50,000 training images of ``../shared/data`` (random horizontal flips),
the cosine-capped DDPM schedule, the class dropped to the empty token 10% of the time (for
classifier-free guidance), AdamW with warm-up then cosine decay, an EMA of the weights (what is
saved). Every random draw of step ``s`` comes from a generator seeded by ``(seed, s)`` and the
data order of epoch ``e`` from ``(seed, e)``, so a run stopped and resumed from its checkpoint
gives the same weights as one that never stopped (same thread count). The checkpoint
(``--work``, not committed) is written every ``--save-every`` steps; the EMA weights go to
``--out`` (safetensors, committed) and one line per ``--log-every`` steps to ``--log``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "examples")]
import model as M  # noqa: E402

WEIGHTS = HERE / "cifar_unet.safetensors"
LOG = HERE / "train_log.jsonl"


def arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--drop-class", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stop-after", type=float, default=None,
                   help="minutes: save and exit after this long (resume later)")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--work", type=Path, default=HERE.parents[1] / "benchmarks" / "out" / "diffusion")
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--log", type=Path, default=LOG)
    return p.parse_args(argv)


def learning_rate(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    done = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def batch_indices(step: int, args, n: int) -> torch.Tensor:
    per_epoch = n // args.batch
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
    return order[k * args.batch:(k + 1) * args.batch]


def train_step(net, sched, images, labels, step, args):
    """One loss on a batch; every draw from the step's own generator."""
    g = torch.Generator().manual_seed(args.seed * 1000003 + step)
    b = images.shape[0]
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], images.flip(-1), images)
    latent = M.to_latent(x)
    noise = torch.randn(latent.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g)
    drop = torch.rand(b, generator=g) < args.drop_class
    labels = torch.where(drop, torch.full_like(labels, M.NULL), labels)
    noisy = sched.add_noise(latent, noise, t)
    return F.mse_loss(net(noisy, t, labels), noise)


def save_weights(ema, path: Path):
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(path))


def main(argv=None):
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    # early steps make denormal activations and gradients: 10x slower on CPU without this
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    import cifar_vit
    images, labels = cifar_vit.load_train_uint8(progress=True)
    images = images.permute(0, 3, 1, 2).float().div(127.5).sub(1)  # [-1, 1], NCHW

    net, ema = M.ClassUNet(), M.ClassUNet()
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    sched = M.scheduler("ddpm")
    ckpt = args.work / "train_state.pt"
    step, seconds = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        net.load_state_dict(state["net"]), ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, seconds = state["step"], state["seconds"]
        print(f"resumed at step {step} ({seconds / 60:.1f} min trained)")
    args.work.mkdir(parents=True, exist_ok=True)

    def save():
        torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "step": step, "seconds": seconds, "args": vars(args)}, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)
        save_weights(ema, args.out)

    start, window = time.monotonic(), []
    net.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True)
    while step < args.steps:
        t0 = time.monotonic()
        idx = batch_indices(step, args, len(images))
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = train_step(net, sched, images[idx], labels[idx], step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters()):
                e.lerp_(p, 1 - decay)
        step += 1
        seconds += time.monotonic() - t0
        window.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.log_every == 0 or step == args.steps:
            with open(args.log, "a") as f:
                f.write(json.dumps({"step": step, "loss": sum(window) / len(window),
                                    "lr": learning_rate(step - 1, args),
                                    "minutes": round(seconds / 60, 2),
                                    "threads": args.threads}) + "\n")
            window = []
        if step % args.save_every == 0 or step == args.steps:
            save()
        if args.stop_after and time.monotonic() - start > args.stop_after * 60:
            save()
            print(f"stopped at step {step}: run again to resume")
            return
    save()
    print(f"done: {step} steps, {seconds / 60:.1f} min of training")


if __name__ == "__main__":
    main()
