"""Throughput of tome_fx against the original model and a reference ToMe, side by side.

One run, the same input batch for every variant. Per model/resolution: the original (eager and
torch.compile'd); per budget: tome_fx (``optimize(flops_budget=b)``, eager and compiled) and the
reference ToMe of ``tome_patch.py`` (explicit attention, Python state, as the paper's released
code) at tome_fx's per-block schedule, eager and compiled. Timed calls are interleaved
round-robin (the order rotates every round) so machine-load drift hits all variants alike; the
reported time is the median over rounds after warm-up. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` on each eager variant at batch 1.

speed-up = images/s of the variant / images/s of the original in the same mode (eager/compiled)
efficiency = speed-up x FLOP ratio (1.0: time fell exactly as much as FLOPs)

    python benchmarks/bench_speed.py                      # CPU: fp32, batch 16; CUDA: bf16, 256
    python benchmarks/bench_speed.py --models vit_small_patch16_224 --budgets 0.5 --runs 5
    python benchmarks/bench_speed.py --with-384           # also 384 px

Writes ``<out>/speed_<tag>.json``, ``.md`` and ``.png`` (tag: cpu or cuda unless given).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's tome_fx, not an installed one
sys.path.insert(0, str(HERE))
import timm  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import tome_fx  # noqa: E402
from tome_fx.compiling import compile_module  # noqa: E402
from tome_patch import apply_tome  # noqa: E402

MODELS = ["vit_small_patch16_224", "vit_base_patch16_224"]
BUDGETS = [0.75, 0.5]
METHODS = ["original", "tome_fx", "reference"]
MODES = ["eager", "compiled"]


@dataclass
class Variant:
    method: str  # original | tome_fx | reference
    mode: str  # eager | compiled
    budget: float | None
    module: torch.nn.Module = field(repr=False)
    schedule: list | None = None
    flops: int | None = None  # per image
    compile_s: float | None = None  # first call (compilation included)
    graphs: int | None = None  # dynamo graphs compiled for it
    graph_breaks: int | None = None
    recompiles_while_timed: int | None = None
    times: list = field(default_factory=list)
    max_abs_diff: float | None = None  # vs the eager original/tome_fx output, see check()

    @property
    def name(self):
        b = "" if self.budget is None else f"@{self.budget:g}"
        return f"{self.method}{b}/{self.mode}"


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops(module, x1) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(x1)
    return counter.get_total_flops()


def _dynamo_stats():
    from torch._dynamo.utils import counters

    return (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))


def build(model_name, img, budgets, device, dtype, methods, modes, x1):
    torch.manual_seed(0)
    original = timm.create_model(model_name, pretrained=False, img_size=img).eval().to(device, dtype)
    variants = []
    base_flops = count_flops(original, x1)
    for mode in modes:
        if "original" in methods:
            mod = original if mode == "eager" else torch.compile(original)
            variants.append(Variant("original", mode, None, mod, flops=base_flops))
    for b in budgets:
        t = time.perf_counter()
        fast = tome_fx.optimize(original, flops_budget=b, example_inputs=(x1,))
        plan_s = time.perf_counter() - t
        schedule = list(fast.tome.r)
        print(f"  budget {b}: schedule {schedule} (planned in {plan_s:.1f} s)", flush=True)
        ref = apply_tome(original, schedule)
        fl = {"tome_fx": count_flops(fast, x1), "reference": count_flops(ref, x1)}
        for mode in modes:
            if "tome_fx" in methods:
                mod = fast if mode == "eager" else compile_module(fast)
                variants.append(Variant("tome_fx", mode, b, mod, schedule, fl["tome_fx"]))
            if "reference" in methods:
                mod = ref if mode == "eager" else torch.compile(ref)
                variants.append(Variant("reference", mode, b, mod, schedule, fl["reference"]))
    return variants, base_flops


def warm_up(variants, x, device, warmup):
    """First calls (compilation for compiled variants), then ``warmup`` more untimed calls."""
    outs = {}
    with torch.inference_mode():
        for v in variants:
            g0, b0 = _dynamo_stats()
            sync(device)
            t = time.perf_counter()
            outs[v.name] = v.module(x).float()
            sync(device)
            if v.mode == "compiled":
                v.compile_s = time.perf_counter() - t
                g1, b1 = _dynamo_stats()
                v.graphs, v.graph_breaks = g1 - g0, b1 - b0
            print(f"  first call {v.name}: {time.perf_counter() - t:.1f} s", flush=True)
        for _ in range(warmup):
            for v in variants:
                v.module(x)
    sync(device)
    return outs


def check(variants, outs):
    """max abs diff: compiled output vs the same method's eager output; reference eager vs
    tome_fx eager (same schedule, same algorithm, so they should agree to rounding)."""
    for v in variants:
        if v.mode == "compiled":
            v.max_abs_diff = (outs[v.name] - outs[v.name.replace("/compiled", "/eager")]).abs().max().item() \
                if v.name.replace("/compiled", "/eager") in outs else None
        elif v.method == "reference" and f"tome_fx@{v.budget:g}/eager" in outs:
            v.max_abs_diff = (outs[v.name] - outs[f"tome_fx@{v.budget:g}/eager"]).abs().max().item()


def time_rounds(variants, x, device, runs, clock=time.perf_counter):
    g0, _ = _dynamo_stats()
    with torch.inference_mode():
        for i in range(runs):
            k = i % len(variants)
            for v in variants[k:] + variants[:k]:  # rotate the order every round
                sync(device)
                t = clock()
                v.module(x)
                sync(device)
                v.times.append(clock() - t)
    g1, _ = _dynamo_stats()
    for v in variants:
        if v.mode == "compiled":
            v.recompiles_while_timed = g1 - g0  # across all variants; expected 0


def summarise(variants, batch, base_flops):
    rows = []
    base = {v.mode: statistics.median(v.times) for v in variants if v.method == "original"}
    for v in variants:
        med = statistics.median(v.times)
        q = statistics.quantiles(v.times, n=4) if len(v.times) >= 2 else [med, med, med]
        ratio = v.flops / base_flops if v.flops and base_flops else None
        speedup = base[v.mode] / med if v.mode in base else None
        row = {
            "variant": v.name, "method": v.method, "mode": v.mode, "budget": v.budget,
            "schedule": v.schedule, "median_s": med, "iqr_s": q[2] - q[0],
            "images_per_s": batch / med, "speedup": speedup, "flop_ratio": ratio,
            "efficiency": speedup * ratio if speedup and ratio else None,
            "gflops_per_image": v.flops / 1e9 if v.flops else None,
            "compile_s": v.compile_s, "graphs": v.graphs, "graph_breaks": v.graph_breaks,
            "recompiles_while_timed": v.recompiles_while_timed, "max_abs_diff": v.max_abs_diff,
            "runs": len(v.times),
        }
        rows.append(row)
    return rows


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def markdown(results, meta) -> str:
    lines = [
        f"Device: {meta['device']} ({meta['dtype']}), batch {meta['batch']}, "
        f"{meta['runs']} timed rounds after {meta['warmup']} warm-up, median {meta['clock']} "
        f"time; "
        f"CPU: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
        f"torch {meta['machine']['torch']} ({meta['machine']['torch_threads']} threads)"
        + (f", GPU: {meta['machine']['gpu']}" if meta["machine"].get("gpu") else "")
        + (f"; load average start {meta['machine']['loadavg_start'][0]:.1f}, end "
           f"{meta['machine']['loadavg_end'][0]:.1f}" if "loadavg_end" in meta["machine"] else ""),
        "",
        "| model | px | budget | method | mode | images/s | speed-up | FLOP ratio | efficiency "
        "| graphs / breaks | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["rows"]:
            gb = "" if r["graphs"] is None else f"{r['graphs']} / {r['graph_breaks']}"
            lines.append(
                f"| {res['model']} | {res['img_size']} | {_fmt(r['budget'], 'g') or '-'} "
                f"| {r['method']} | {r['mode']} | {r['images_per_s']:.2f} "
                f"| {_fmt(r['speedup'], '.3f')} | {_fmt(r['flop_ratio'], '.4f')} "
                f"| {_fmt(r['efficiency'], '.3f')} | {gb} | {_fmt(r['max_abs_diff'], '.1e')} |"
            )
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for res in results for r in res["rows"]}, key=MODES.index)
    fig, axes = plt.subplots(len(results), len(modes), squeeze=False,
                             figsize=(5 * len(modes), 3.6 * len(results)))
    colors = {"original": "black", "tome_fx": "tab:blue", "reference": "tab:orange"}
    for i, res in enumerate(results):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            rows = [r for r in res["rows"] if r["mode"] == mode]
            base = next((r for r in rows if r["method"] == "original"), None)
            if base:
                xs = [0.3 + 0.01 * i for i in range(71)]
                ax.plot(xs, [base["images_per_s"] / x for x in xs], ":", color="gray",
                        label="FLOP limit (original / ratio)")
            for method in METHODS:
                pts = sorted((r["flop_ratio"], r["images_per_s"]) for r in rows
                             if r["method"] in (method, "original") and r["flop_ratio"])
                if pts:
                    ax.plot(*zip(*pts), "o-", color=colors[method], label=method)
            ax.set_title(f"{res['model']} {res['img_size']}px, {mode}", fontsize=9)
            ax.set_xlabel("FLOP ratio")
            ax.set_ylabel("images/s")
            ax.set_xlim(0.3, 1.05)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, help="timm model names")
    p.add_argument("--img-sizes", nargs="+", type=int, default=[224])
    p.add_argument("--with-384", action="store_true", help="add 384 px (slow on CPU)")
    p.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    p.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    p.add_argument("--runs", type=int, default=10, help="timed rounds (one call per variant each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first call")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time (CPU only; steadier on a shared machine with "
                        "--threads 1, where it equals compute time)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default=None, help="output file suffix (default: device type)")
    a = p.parse_args(argv)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch = a.batch or (256 if device.type == "cuda" else 16)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu is for CPU runs")
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    sizes = sorted(set(a.img_sizes + ([384] if a.with_384 else [])))
    meta = {
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch": batch,
        "runs": a.runs, "warmup": a.warmup, "clock": a.clock, "machine": machine(),
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
    }
    results = []
    for name in a.models:
        for img in sizes:
            print(f"{name} @ {img}px", flush=True)
            torch.manual_seed(1)
            x = torch.randn(batch, 3, img, img, device=device, dtype=dtype)
            x1 = x[:1].clone()
            variants, base_flops = build(name, img, a.budgets, device, dtype, a.methods,
                                         a.modes, x1)
            if not any(v.method == "original" for v in variants):
                raise SystemExit("--methods must include original (speed-ups are relative to it)")
            outs = warm_up(variants, x, device, a.warmup)
            check(variants, outs)
            time_rounds(variants, x, device, a.runs, clock)
            rows = summarise(variants, batch, base_flops)
            for r in rows:
                print(f"  {r['variant']:28s} {r['images_per_s']:9.2f} img/s  "
                      f"speed-up {_fmt(r['speedup'], '.3f'):>6}  ratio {_fmt(r['flop_ratio'], '.4f')}"
                      f"  eff {_fmt(r['efficiency'], '.3f')}", flush=True)
            results.append({"model": name, "img_size": img, "gflops_original": base_flops / 1e9,
                            "rows": rows})
            del variants, outs
    if hasattr(os, "getloadavg"):
        meta["machine"]["loadavg_end"] = list(os.getloadavg())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = a.tag or device.type
    (out / f"speed_{tag}.json").write_text(json.dumps({"meta": meta, "results": results},
                                                      indent=1) + "\n")
    (out / f"speed_{tag}.md").write_text(markdown(results, meta))
    plot(results, out / f"speed_{tag}.png")
    print(f"wrote {out}/speed_{tag}.json, .md, .png")
    return results


if __name__ == "__main__":
    main()
