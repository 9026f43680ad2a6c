"""onnxruntime CPU throughput of the original model and tome_fx's, both exported to ONNX.

Per model: the original and ``optimize(flops_budget=b)`` for each budget are written with
``tome_fx.export`` (which checks each file against its module), then timed in one process with
onnxruntime's CPU provider (``intra_op_num_threads`` and ``inter_op_num_threads`` 1, sequential
execution, default graph optimisations) on one random batch. Timed calls are interleaved
round-robin, the order rotating every round, so load drift hits every variant alike; the
reported time is the median over rounds after warm-up.

speed-up = images/s of the variant / images/s of the original ONNX model, same run.

    taskset -c 1 python benchmarks/bench_onnx.py                  # ViT-S/16, ViT-B/16; 0.75, 0.5
    taskset -c 1 python benchmarks/bench_onnx.py --models vit_small_patch16_224 --budgets 0.5

Writes ``<out>/onnx_<tag>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's tome_fx, not an installed one
import onnxruntime as ort  # noqa: E402
import timm  # noqa: E402

import tome_fx  # noqa: E402
from bench_speed import machine as speed_machine  # noqa: E402

MODELS = ["vit_small_patch16_224", "vit_base_patch16_224"]
BUDGETS = [0.75, 0.5]
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def machine() -> dict:
    """``bench_speed.machine`` (CPU, cores, versions, load) plus onnxruntime's version."""
    return {**speed_machine(), "onnxruntime": ort.__version__}


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def build(name: str, budgets, folder: str, x_example, strategy: str):
    """[(label, budget, flop ratio, schedule, module, onnx path, export result)]"""
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False).eval()
    variants = []
    t = time.perf_counter()
    path = os.path.join(folder, f"{name}-original.onnx")
    res = tome_fx.export(original, path, x_example, verbose=False)
    print(f"  original: exported in {time.perf_counter() - t:.0f} s, max |diff| "
          f"{max(res.max_diff.values()):.2g}", flush=True)
    variants.append(("original", None, 1.0, None, original, path, res))
    for b in budgets:
        t = time.perf_counter()
        fast = tome_fx.optimize(original, flops_budget=b, example_inputs=x_example,
                                strategy=strategy)
        path = os.path.join(folder, f"{name}-tome_fx-{b:g}.onnx")
        res = tome_fx.export(fast, path, x_example, verbose=False)
        print(f"  budget {b:g}: r {list(fast.tome.r)}, FLOP ratio {fast.tome.ratio:.4f}, "
              f"optimized and exported in {time.perf_counter() - t:.0f} s, max |diff| "
              f"{max(res.max_diff.values()):.2g}", flush=True)
        variants.append((f"tome_fx@{b:g}", b, fast.tome.ratio, list(fast.tome.r), fast, path, res))
    return variants


def run_model(name, args, folder):
    g = torch.Generator().manual_seed(0)
    x_example = torch.randn(2, 3, 224, 224, generator=g)
    x = torch.randn(args.batch, 3, 224, 224, generator=g)
    variants = build(name, args.budgets, folder, x_example, args.strategy)
    sessions = [session(v[5]) for v in variants]
    feeds = [{s.get_inputs()[0].name: x.numpy()} for s in sessions]
    diffs = []
    for v, s, feed in zip(variants, sessions, feeds):  # first call, and the batch's agreement
        with torch.no_grad():
            want = v[4](x)
        got = torch.from_numpy(s.run(None, feed)[0])
        diffs.append((got - want).abs().max().item())
    for _ in range(args.warmup):
        for s, feed in zip(sessions, feeds):
            s.run(None, feed)
    times = {c: [[] for _ in variants] for c in CLOCKS}  # both clocks, every call
    for i in range(args.runs):
        k = i % len(variants)
        for j in list(range(k, len(variants))) + list(range(k)):  # rotate the order every round
            t = {c: f() for c, f in CLOCKS.items()}
            sessions[j].run(None, feeds[j])
            for c, f in CLOCKS.items():
                times[c][j].append(f() - t[c])
    base = statistics.median(times[args.clock][0])
    base_other = {c: statistics.median(ts[0]) for c, ts in times.items()}
    rows = []
    for j, (v, diff) in enumerate(zip(variants, diffs)):
        med = statistics.median(times[args.clock][j])
        other = {f"speedup_{c}": base_other[c] / statistics.median(ts[j]) for c, ts in times.items()}
        rows.append({"model": name, "variant": v[0], "budget": v[1], "flop_ratio": v[2],
                     "schedule": v[3], "images_per_s": args.batch / med, "median_s": med,
                     "speedup": base / med, **other,
                     "times_s": {c: ts[j] for c, ts in times.items()}, "max_abs_diff_batch": diff,
                     "export_max_diff": v[6].max_diff,
                     "onnx_mb": os.path.getsize(v[5]) / 1e6})
        print(f"  {v[0]:>14}: {args.batch / med:7.2f} images/s, speed-up {base / med:.3f}x",
              flush=True)
    return rows


def markdown(info, rows, args, command) -> str:
    other = next(c for c in CLOCKS if c != args.clock)
    lines = [f"```\n{command}\n```", "",
             f"onnxruntime {info['onnxruntime']} CPU provider, 1 intra-op and 1 inter-op thread, "
             f"fp32, batch {args.batch}, 224 px, {args.runs} timed rounds after {args.warmup} "
             f"warm-up, median {args.clock} time; CPU: {info['cpu']}, {info['cores']} cores; "
             f"torch {info['torch']}; load average start {info['loadavg_start'][0]:.1f}, end "
             f"{info['loadavg_end'][0]:.1f}", "",
             f"| model | budget | variant | images/s | speed-up | speed-up ({other} time) | "
             "FLOP ratio | max abs diff vs torch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'-' if r['budget'] is None else r['budget']} | "
                     f"{r['variant']} | {r['images_per_s']:.2f} | {r['speedup']:.3f} | "
                     f"{r['speedup_' + other]:.3f} | {r['flop_ratio']:.4f} | "
                     f"{r['max_abs_diff_batch']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or process CPU time (steadier on a shared machine)")
    p.add_argument("--strategy", default="auto", help="optimize's schedule strategy")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default="cpu1")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the .onnx files here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    info = machine()
    command = "python benchmarks/bench_onnx.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        for name in args.models:
            print(name, flush=True)
            rows += run_model(name, args, folder)
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"onnx_{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump({"machine": info, "args": vars(args), "command": command, "rows": rows}, f,
                  indent=2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(info, rows, args, command))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
