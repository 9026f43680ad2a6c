"""ToMeSD fidelity without real weights: per-step relative error of the noise prediction against
the original UNet, tome_fx beside the authors' ``tomesd`` at equal ratio, on one random-weight
SD1.5-shaped UNet (``bench_tomesd.unet``).

A 10-step DDIM run with classifier-free guidance (scale 7.5, random 77-token text embeddings)
follows the original model; at each step every variant predicts the noise for the same latent
and its guided prediction is compared with the original's (``||e - e0|| / ||e0||``). Each
variant also runs its own trajectory: the last column is the final latent's relative error.
With ``use_rand=False`` both implementations compute the same function (their columns agree to
float rounding); with ``use_rand=True`` each draws its own random destinations (tomesd from its
forked generator, tome_fx from a seeded hash of the timestep), so they differ by chance.

    python benchmarks/bench_tomesd_fidelity.py                 # ratios 0.3 0.5 0.7, 64x64 latent

Writes ``<out>/tomesd_fidelity.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import diffusers  # noqa: E402
import tomesd  # noqa: E402

import tome_fx  # noqa: E402
from bench_tomesd import unet  # noqa: E402
from tome_fx.diffusion import default_inputs  # noqa: E402

GUIDANCE = 7.5


def guided(model, latent, t, text):
    """The classifier-free-guided noise prediction for ``latent`` (batch 1) at step ``t``."""
    with torch.no_grad():
        out = model(torch.cat([latent, latent]), t, encoder_hidden_states=text)
    eps = out.sample if hasattr(out, "sample") else out[0]
    uncond, cond = eps.chunk(2)
    return uncond + GUIDANCE * (cond - uncond)


def trajectory(model, scheduler, latent, text, steps):
    """(latents entering each step, the final latent) of a DDIM run of ``model``."""
    scheduler.set_timesteps(steps)
    seen = []
    for t in scheduler.timesteps:
        seen.append(latent)
        latent = scheduler.step(guided(model, latent, t, text), t, latent).prev_sample
    return seen, latent


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.3,0.5,0.7")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    model = unet(args.latent)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 77, 128, generator=g)
    latent = torch.randn(1, 4, args.latent, args.latent, generator=g)
    scheduler = diffusers.DDIMScheduler()
    example = default_inputs(model, 2, generator=torch.Generator().manual_seed(1))
    example["encoder_hidden_states"] = text
    seen, final = trajectory(model, scheduler, latent, text, args.steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    reference = [guided(model, x, t, text) for x, t in zip(seen, scheduler.timesteps)]
    results = []
    for use_rand in (False, True):
        for ratio in ratios:
            fast = tome_fx.optimize(model, method="tomesd", ratio=ratio, use_rand=use_rand,
                                    seed=0, example_inputs=example)
            patched = copy.deepcopy(model)
            tomesd.apply_patch(patched, ratio=ratio, use_rand=use_rand)
            for name, variant in (("tome_fx", fast), ("tomesd", patched)):
                errors = [relative(guided(variant, x, t, text), e0)
                          for x, t, e0 in zip(seen, scheduler.timesteps, reference)]
                own = trajectory(variant, scheduler, latent, text, args.steps)[1]
                results.append({"use_rand": use_rand, "ratio": ratio, "method": name,
                                "per_step": errors, "final_latent": relative(own, final)})
                print(results[-1]["method"], use_rand, ratio,
                      " ".join(f"{e:.4f}" for e in errors), f"final {results[-1]['final_latent']:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"command": " ".join(["python"] + sys.argv), "latent": args.latent, "steps": args.steps,
            "guidance": GUIDANCE, "timesteps": timesteps, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "results": results}
    (out / "tomesd_fidelity.json").write_text(json.dumps(info, indent=2))
    head = ["use_rand", "ratio", "method"] + [f"t={t}" for t in timesteps] + ["final latent"]
    lines = [f"Relative error of the guided noise prediction against the original, per DDIM step "
             f"(SD1.5-shaped random-weight UNet, {args.latent}x{args.latent} latent, guidance "
             f"{GUIDANCE}); last column: the variant's own final latent against the original's.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [str(r["use_rand"]), f"{r['ratio']:g}", r["method"]]
        cells += [f"{e:.4f}" for e in r["per_step"]] + [f"{r['final_latent']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "tomesd_fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
