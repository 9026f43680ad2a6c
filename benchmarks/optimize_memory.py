"""Memory of ``tome_fx.optimize`` on an SD1.5-sized UNet: does the result hold a second copy
of the weights (issue 38)?

Each measurement runs in a fresh subprocess (peak RSS, ``ru_maxrss``, only grows): it builds a
diffusers ``UNet2DConditionModel`` with SD1.5's real config (block_out_channels (320, 640, 1280,
1280), two layers per block, 768-d text, 8 heads; random weights, ~860M parameters, ~3.4 GB in
fp32), then ``tome_fx.optimize(unet, method="tomesd", ratio=0.5, example_inputs=...)`` on a
small latent (``--latent``, default 32: 4x32x32, batch 1; memory of the weights, not of the
activations, is what this measures). It reports the resident set size (``VmRSS``) and the peak
(``ru_maxrss``) after the build and after ``optimize``, and whether every parameter of the
rewritten graph is one of the model's (same storage).

``--package DIR`` puts ``DIR`` first on ``sys.path``, so the same script measures another copy of
``tome_fx`` (the code before a change: ``git -C /work/main archive HEAD tome_fx | tar -x -C DIR``).

    taskset -c 1 python benchmarks/optimize_memory.py --before /tmp/tome_before
    taskset -c 1 python benchmarks/optimize_memory.py --width 0.25   # a quick, smaller UNet

Writes ``benchmarks/results/optimize_memory.json`` (and the markdown table inside it, key
``table``; also printed).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GB = 1024 ** 3


def rss() -> int:
    """Resident set size now, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak() -> int:
    """Peak resident set size so far, in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def unet(width: float, latent: int):
    import diffusers
    import torch

    torch.manual_seed(0)
    chans = tuple(int(c * width) // 32 * 32 for c in (320, 640, 1280, 1280))
    return diffusers.UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=chans,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8).eval()


def measure(package: str, width: float, latent: int) -> dict:
    """One measurement, in this process: build, optimize, RSS at each step."""
    sys.path.insert(0, package)
    import torch

    import tome_fx
    from tome_fx.diffusion import default_inputs

    assert Path(tome_fx.__file__).resolve().is_relative_to(Path(package).resolve()), tome_fx.__file__
    torch.set_num_threads(1)
    start = rss()
    t0 = time.perf_counter()
    model = unet(width, latent)
    build_s = time.perf_counter() - t0
    gc.collect()
    out = {"package": package, "width": width, "latent": latent,
           "params": sum(p.numel() for p in model.parameters()),
           "model_bytes": sum(t.numel() * t.element_size()
                              for t in [*model.parameters(), *model.buffers()]),
           "rss_start": start, "rss_after_build": rss(), "peak_after_build": peak(),
           "build_s": round(build_s, 1)}
    inputs = default_inputs(model, batch=1, size=(4, latent, latent),
                            generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    result = tome_fx.optimize(model, method="tomesd", ratio=0.5, example_inputs=inputs)
    out["optimize_s"] = round(time.perf_counter() - t0, 1)
    gc.collect()
    out.update(rss_after_optimize=rss(), peak_during_optimize=peak())
    graph = getattr(result, "graph", result)
    if not any(True for _ in getattr(graph, "parameters", lambda: [])()):
        graph = next(iter(getattr(result, "graphs", {}).values()), graph)
    mine = {p.data_ptr() for p in model.parameters()}
    theirs = {p.data_ptr() for p in graph.parameters()}
    out["result_param_storages"] = len(theirs)
    out["result_params_shared"] = len(theirs & mine)
    return out


def run_child(package: str, width: float, latent: int, cpu: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", package, "--width", str(width),
           "--latent", str(latent)]
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| code | params | model (GiB) | RSS after build (GiB) | peak during optimize (GiB) "
             "| RSS after optimize (GiB) | held by the result (GiB) | result params shared |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['params'] / 1e6:.0f}M | {r['model_bytes'] / GB:.2f} "
            f"| {r['rss_after_build'] / GB:.2f} | {r['peak_during_optimize'] / GB:.2f} "
            f"| {r['rss_after_optimize'] / GB:.2f} "
            f"| {(r['rss_after_optimize'] - r['rss_after_build']) / GB:.2f} "
            f"| {r['result_params_shared']}/{r['result_param_storages']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--before", help="a copy of tome_fx before the change (its parent folder)")
    ap.add_argument("--width", type=float, default=1.0, help="channel scale (1: SD1.5's width)")
    ap.add_argument("--latent", type=int, default=32, help="latent side of the example inputs")
    ap.add_argument("--cpu", default="1", help="taskset CPU list for the children ('' for none)")
    ap.add_argument("--out", default=str(HERE / "results" / "optimize_memory.json"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, a.width, a.latent)))
        return
    cpu = a.cpu or None
    runs = [("before", a.before)] if a.before else []
    runs.append(("after", str(HERE.parent)))
    rows = []
    for label, package in runs:
        row = run_child(package, a.width, a.latent, cpu)
        row["label"] = label
        rows.append(row)
        print(json.dumps(row), flush=True)
    text = table(rows)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    note = (f"UNet2DConditionModel, SD1.5's config at width x{a.width}, random weights, fp32; "
            f"optimize(method='tomesd', ratio=0.5) on default_inputs(unet, batch=1, size=(4, "
            f"{a.latent}, {a.latent})). GiB = 2**30 bytes (rows: bytes); held by the result = "
            "RSS after optimize - RSS after build.")
    Path(a.out).write_text(json.dumps({
        "issue": 38, "note": note,
        "command": " ".join(["python", *sys.argv]), "machine": platform.platform(),
        "cpus": os.cpu_count(), "rows": rows, "table": text}, indent=1) + "\n")


if __name__ == "__main__":
    main()
