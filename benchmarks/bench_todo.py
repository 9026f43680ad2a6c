"""ToDo speed: tome_fx ``method="todo"`` beside the authors' processor and ToMeSD, one run.

SD1.5-shaped UNet (``bench_tomesd.unet``: SD1.5's layout at a fifth of its width, random weights)
at a 64x64 or 128x128 latent, batch 2, at a timestep before ToDo's switch (t = 999: keys and
values downsampled 2x per side at the finest level). Variants, eager: the original, the
authors' ToDo (their processor's semantics, ``tests/reference_todo.py``), tome_fx ``todo`` at its
defaults, the authors' ``tomesd`` package and tome_fx ``tomesd`` at ratio 0.5; compiled
(inductor): the original, tome_fx ``todo`` and ``tomesd`` (fullgraph) and the authors' ToDo (not
fullgraph). ``--model flux``: a Flux-shaped transformer (random weights) at a 64x64 latent
(1,024 packed image tokens, 128 text tokens) with ``todo`` and ``tomesd``. Timed calls are
interleaved round-robin; the time is the median over rounds of the process CPU time.

    taskset -c 1 python benchmarks/bench_todo.py --latent 64
    taskset -c 1 python benchmarks/bench_todo.py --latent 128 --runs 3
    taskset -c 1 python benchmarks/bench_todo.py --model flux --latent 64

Writes ``<out>/todo_speed_<model><latent>_<tag>.json`` and ``.md``.
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
sys.path.insert(0, str(HERE.parent / "tests"))  # the authors' ToDo, as the tests check it
import diffusers  # noqa: E402
import tomesd  # noqa: E402
from bench_tomesd import inductor_counter, interleaved, positional, unet  # noqa: E402
from flops import counted_flops  # noqa: E402
from reference_todo import ReferenceToDo  # noqa: E402

import tome_fx  # noqa: E402
from tome_fx.diffusion import default_inputs  # noqa: E402

STEP = {"unet": 999.0, "flux": 0.999}  # before the switch (Flux takes t / 1000)


def flux(latent: int) -> torch.nn.Module:
    """Flux's layout, small: 2 double-stream and 4 single-stream blocks, 4 heads of 32."""
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=64,
        axes_dims_rope=(4, 14, 14)).eval()


def build(name: str, latent: int, batch: int):
    model = unet(latent) if name == "unet" else flux(latent)
    size = None if name == "unet" else ((latent // 2) ** 2, 64)
    inputs = default_inputs(model, batch, size=size, generator=torch.Generator().manual_seed(0))
    if name == "flux":
        inputs["encoder_hidden_states"] = torch.randn(batch, 128, 128,
                                                      generator=torch.Generator().manual_seed(1))
        inputs["txt_ids"] = torch.zeros(128, 3)
    inputs["timestep"] = torch.full((batch,), STEP[name])
    return model, inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("unet", "flux"), default="unet")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="cpu1")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    model, inputs = build(args.model, args.latent, args.batch)
    first_key = "sample" if args.model == "unet" else "hidden_states"
    rest = {k: v for k, v in inputs.items() if k != first_key}

    built = {}
    for method, options in (("todo", {}), ("tomesd", {"ratio": 0.5, "use_rand": False})):
        t0 = time.perf_counter()
        built[method] = tome_fx.optimize(model, method=method, example_inputs=inputs, **options)
        built[method + "_s"] = time.perf_counter() - t0
    variants = {("original", "eager"): model, ("tome_fx todo", "eager"): built["todo"],
                ("tome_fx tomesd 0.5", "eager"): built["tomesd"]}
    if args.model == "unet":
        authors_todo = ReferenceToDo(copy.deepcopy(model), widths=(64, 128)).apply()
        authors_tomesd = copy.deepcopy(model)
        tomesd.apply_patch(authors_tomesd, ratio=0.5, use_rand=False)
        variants[("authors' ToDo", "eager")] = positional(authors_todo)
        variants[("authors' tomesd 0.5", "eager")] = positional(authors_tomesd)
    counters = {}
    if not args.no_compile:
        compiled = [("original", model, False), ("tome_fx todo", built["todo"].graph, True),
                    ("tome_fx tomesd 0.5", built["tomesd"].graph, True)]
        if args.model == "unet":
            compiled.append(("authors' ToDo", authors_todo, False))
        for name, module, full in compiled:
            counters[name] = inductor_counter()
            fn = torch.compile(module, backend=counters[name], fullgraph=full)
            variants[(name, "compiled")] = positional(fn) if name.startswith("authors") else fn

    def run(fn):
        with torch.no_grad():
            out = fn(inputs[first_key], **rest)
        return out.sample if hasattr(out, "sample") else out[0]

    first, outputs, cpu, wall = interleaved(variants, run, args.runs)
    keys = list(variants)
    flops = {}  # counted (tests/flops.py: every SDPA kernel registered), eager variants
    for key in keys:
        if key[1] == "eager":
            with torch.no_grad():
                flops[key[0]] = counted_flops(lambda: run(variants[key]))
    ref = outputs[("original", "eager")]
    authors = outputs.get(("authors' ToDo", "eager"))
    rows = []
    for key in keys:
        name, mode = key
        base = statistics.median(cpu[("original", mode)])
        sec = statistics.median(cpu[key])
        counter = counters.get(name) if mode == "compiled" else None
        rows.append({"method": name, "mode": mode, "cpu_s": sec,
                     "wall_s": statistics.median(wall[key]), "speedup": base / sec,
                     "first_call_s": first[key],
                     "graphs": counter.frame_count if counter else None,
                     "flop_ratio": flops[name] / flops["original"],
                     "rel_error_vs_original": float((outputs[key] - ref).norm() / ref.norm()),
                     "rel_diff_vs_authors_todo": None if authors is None or "todo" not in name
                     else float((outputs[key] - authors).norm() / authors.norm())})
    info = {"command": " ".join(["python"] + sys.argv), "model": args.model,
            "latent": args.latent, "batch": args.batch, "runs": args.runs, "threads": args.threads,
            "timestep": STEP[args.model], "torch": torch.__version__,
            "diffusers": diffusers.__version__, "cpu": platform.processor() or platform.machine(),
            "cpus_allowed": sorted(os.sched_getaffinity(0)), "load_start": load0,
            "load_end": os.getloadavg()[0],
            "optimize_s": {m: built[m + "_s"] for m in ("todo", "tomesd")}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"todo_speed_{args.model}{args.latent}_{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps(info, indent=2))
    what = "SD1.5-shaped UNet" if args.model == "unet" else "Flux-shaped transformer"
    lines = [f"{what} (random weights), {args.latent}x{args.latent} latent, batch {args.batch}, "
             f"timestep {STEP[args.model]} (before the switch), {args.threads} thread(s), median "
             f"CPU time of {args.runs} interleaved rounds; torch {torch.__version__}, diffusers "
             f"{diffusers.__version__}; load average {load0:.1f} -> {info['load_end']:.1f}", "",
             "| method | mode | s / call (CPU) | s / call (wall) | speed-up | FLOP ratio | graphs "
             "| first call s | rel. error vs original | rel. diff vs authors' ToDo |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["flop_ratio"] is None else f"{r['flop_ratio']:.3f}"
        diff = "" if r["rel_diff_vs_authors_todo"] is None else f"{r['rel_diff_vs_authors_todo']:.1e}"
        lines.append(f"| {r['method']} | {r['mode']} | {r['cpu_s']:.3f} | {r['wall_s']:.3f} | "
                     f"{r['speedup']:.2f}x | {ratio} | {r['graphs'] if r['graphs'] else ''} | "
                     f"{r['first_call_s']:.1f} | {r['rel_error_vs_original']:.4f} | {diff} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
