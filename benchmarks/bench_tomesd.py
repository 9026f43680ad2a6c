"""ToMeSD speed: tome_fx (``method="tomesd"``) beside the authors' ``tomesd`` patch, one run.

A small SD1.5-shaped UNet (random weights: 4 levels, the last without attention, two resnets
and transformer blocks per level, cross-attention to 77 text tokens) at a 64x64 latent (512 px),
batch 2 (a prompt and its unconditional twin). Variants: the original, ``tomesd.apply_patch``
and tome_fx at the same ratio, eager; the original and tome_fx under ``torch.compile``
(inductor, fullgraph for tome_fx), and the authors' patch under ``torch.compile`` (not
fullgraph: it breaks the graph). Timed calls are interleaved round-robin so load drift hits every
variant alike; the time is the median over rounds of the process CPU time (one pinned thread),
wall time beside it.

    taskset -c 1 python benchmarks/bench_tomesd.py            # ratio 0.5, 64x64 latent
    taskset -c 1 python benchmarks/bench_tomesd.py --ratio 0.3 --latent 32 --no-compile
    python benchmarks/bench_tomesd.py --breaks-only     # graph breaks with use_rand=True

Writes ``<out>/tomesd_speed_<tag>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's tome_fx, not an installed one
import diffusers  # noqa: E402
import tomesd  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import tome_fx  # noqa: E402
from tome_fx.diffusion import default_inputs  # noqa: E402


def unet(latent: int) -> torch.nn.Module:
    """SD1.5's layout at a fifth of its width (64..256 channels, 8 heads, 128-d text)."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32).eval()


def positional(module):
    """The authors' patch reads the latent size from the first positional input."""
    return lambda sample, **kw: module(sample, **kw)


def inductor_counter():
    """An inductor backend that counts the graphs dynamo hands it (breaks + 1)."""
    from torch._inductor.compile_fx import compile_fx

    return CompileCounterWithBackend(compile_fx)


def interleaved(variants: dict, run, runs: int, warmup: int = 1) -> tuple:
    """(first-call seconds, outputs, CPU seconds, wall seconds) per variant: each called
    ``warmup`` times (compilation outside the timed rounds), then ``runs`` round-robin rounds,
    each starting one variant later, so load drift hits every variant alike."""
    first, outputs = {}, {}
    for key, fn in variants.items():
        t0 = time.perf_counter()
        outputs[key] = run(fn)
        first[key] = time.perf_counter() - t0
        print(f"{key}: first call {first[key]:.1f} s", flush=True)
        for _ in range(warmup - 1):
            run(fn)
    cpu, wall = {k: [] for k in variants}, {k: [] for k in variants}
    keys = list(variants)
    for i in range(runs):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            c0, w0 = time.process_time(), time.perf_counter()
            run(variants[key])
            cpu[key].append(time.process_time() - c0)
            wall[key].append(time.perf_counter() - w0)
    return first, outputs, cpu, wall


def graph_breaks(model, inputs, ratio: float) -> dict:
    """Dynamo graph breaks with random destinations (``use_rand=True``, the authors' default):
    the authors' patch forks a torch.Generator, tome_fx hashes a seed (no inductor run)."""
    patched = copy.deepcopy(model)
    tomesd.apply_patch(patched, ratio=ratio, use_rand=True)
    fast = tome_fx.optimize(model, method="tomesd", ratio=ratio, use_rand=True, seed=0,
                            example_inputs=inputs)
    rest = {k: v for k, v in inputs.items() if k != "sample"}
    out = {}
    for name, module in (("tomesd", patched), ("tome_fx", fast.graph)):
        torch._dynamo.reset()
        with torch.no_grad():
            found = torch._dynamo.explain(module)(inputs["sample"], **rest)
        out[name] = {"graphs": found.graph_count, "breaks": found.graph_break_count}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="cpu1")
    ap.add_argument("--breaks-only", action="store_true",
                    help="only count dynamo graph breaks with use_rand=True (no timing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]

    model = unet(args.latent)
    inputs = default_inputs(model, args.batch, generator=torch.Generator().manual_seed(0))
    if args.breaks_only:
        found = graph_breaks(model, inputs, args.ratio)
        out = Path(args.out) / f"tomesd_graph_breaks_{args.tag}.json"
        out.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), **found}, indent=2))
        print(json.dumps(found, indent=2))
        return
    rest = {k: v for k, v in inputs.items() if k != "sample"}
    t0 = time.perf_counter()
    fast = tome_fx.optimize(model, method="tomesd", ratio=args.ratio, use_rand=False,
                            example_inputs=inputs)
    optimize_s = time.perf_counter() - t0
    patched = copy.deepcopy(model)
    tomesd.apply_patch(patched, ratio=args.ratio, use_rand=False)
    variants = {("original", "eager"): model, ("tomesd", "eager"): positional(patched),
                ("tome_fx", "eager"): fast}
    counters = {}
    if not args.no_compile:
        for (name, module, full) in (("original", model, False), ("tome_fx", fast.graph, True),
                                     ("tomesd", patched, False)):
            counters[name] = inductor_counter()
            compiled = torch.compile(module, backend=counters[name], fullgraph=full)
            variants[(name, "compiled")] = positional(compiled) if name == "tomesd" else compiled

    def run(fn):
        with torch.no_grad():
            out = fn(inputs["sample"], **rest)
        return out.sample if hasattr(out, "sample") else out[0]

    first, outputs, cpu, wall = interleaved(variants, run, args.runs, args.warmup)
    keys = list(variants)
    ref = outputs[("original", "eager")]
    rows = []
    for key in keys:
        name, mode = key
        base = statistics.median(cpu[("original", mode)])
        sec = statistics.median(cpu[key])
        diff = (outputs[key] - outputs[("tomesd", "eager")]).norm() / outputs[("tomesd", "eager")].norm()
        counter = counters.get(name) if mode == "compiled" else None
        rows.append({"method": name, "mode": mode, "cpu_s": sec,
                     "wall_s": statistics.median(wall[key]), "speedup": base / sec,
                     "first_call_s": first[key],
                     "graphs": counter.frame_count if counter else None,
                     "rel_error_vs_original": float((outputs[key] - ref).norm() / ref.norm()),
                     "rel_diff_vs_tomesd_eager": float(diff)})
    info = {"command": " ".join(["python"] + sys.argv), "ratio": args.ratio,
            "latent": args.latent, "batch": args.batch, "runs": args.runs, "threads": args.threads,
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cpu": platform.processor() or platform.machine(), "load_start": load0,
            "cpus_allowed": sorted(os.sched_getaffinity(0)),
            "load_end": os.getloadavg()[0], "optimize_s": optimize_s,
            "plan_flop_ratio": fast.tome.ratio, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tomesd_speed_{args.tag}.json").write_text(json.dumps(info, indent=2))
    lines = [f"SD1.5-shaped UNet (random weights), {args.latent}x{args.latent} latent, batch "
             f"{args.batch}, ratio {args.ratio}, {args.threads} thread(s), median CPU time of "
             f"{args.runs} interleaved rounds; torch {torch.__version__}, diffusers "
             f"{diffusers.__version__}; load average {load0:.1f} -> {info['load_end']:.1f}; "
             f"tome_fx plan FLOP ratio {fast.tome.ratio:.4f}", "",
             "| method | mode | s / call (CPU) | s / call (wall) | speed-up | graphs | first call s "
             "| rel. error vs original | rel. diff vs tomesd eager |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['mode']} | {r['cpu_s']:.3f} | {r['wall_s']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['graphs'] if r['graphs'] is not None else ''} | "
                     f"{r['first_call_s']:.1f} | {r['rel_error_vs_original']:.4f} | "
                     f"{r['rel_diff_vs_tomesd_eager']:.1e} |")
    (out / f"tomesd_speed_{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
