"""The GPU check: correctness on CUDA, then throughput, kernels, memory and merge share, in a
fixed time (about 7 minutes on one H100), written as it goes.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR      # on the GPU machine
    python benchmarks/gpu_check.py --smoke --out /tmp/gc        # CPU dry run of every step

Needs only the repository, PyTorch and timm (no ../shared, no internet). Steps, most important
first; each later step runs only if the time left (``--seconds``) is likely to cover it:

1. correctness, fp32: tome_fx (bias and fold forms) against the independent reference ToMe
   (``tests/reference_tome.py``), max abs difference relative to the output's scale (<= 1e-4);
   bf16: output cosine to the fp32 reference (>= 0.999);
2. throughput (bf16): ViT-B/16 batch 256 at budget 0.5 compiled first, then eager, 0.75, and
   ViT-L/16 batch 128, for the original, the reference ToMe (``benchmarks/tome_patch.py``) at
   tome_fx's schedule, tome_fx bias and tome_fx fold; timed round-robin, medians;
3. per variant: the attention kernels it runs (``torch.profiler`` kernel names), peak memory;
4. the share of tome_fx's forward time in matching + merging (the merges replaced by a stub
   that keeps the first ``N - r`` tokens: same shapes downstream, no matching).

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` after every step.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "tests")]
import timm  # noqa: E402

import tome_fx  # noqa: E402
from flops import counted_flops  # noqa: E402  (tests/flops.py: formulas registered)
from merge_share import stubbed  # noqa: E402
from reference_tome import reference_forward, reference_schedule  # noqa: E402
from tome_fx.compiling import compile_module  # noqa: E402
from tome_patch import apply_tome  # noqa: E402

ATTENTION_WORDS = ("flash", "fmha", "cudnn", "attention", "attn", "efficient", "sdpa", "softmax")
TARGETS = "H100, bf16, ViT-B/16 224 px, batch 256, budget 0.5"


class Check:
    """The results so far, written after every step; the clock that decides what still fits."""

    def __init__(self, out: Path, seconds: float, device, dtype):
        self.out, self.start, self.seconds = out, time.perf_counter(), seconds
        self.device, self.dtype = device, dtype
        self.data = {"env": _env(device), "seconds": seconds, "correctness": [], "speed": [],
                     "kernels": {}, "memory_mb": {}, "merge_share": [], "skipped": []}

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def fits(self, what: str, need: float) -> bool:
        if self.left() >= need:
            return True
        self.data["skipped"].append(f"{what}: about {need:.0f} s needed, {self.left():.0f} s left")
        print(f"skip {what} ({self.left():.0f} s left)", flush=True)
        return False

    def save(self):
        self.data["elapsed_s"] = time.perf_counter() - self.start
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.data))


def _env(device) -> dict:
    cuda = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__, "timm": timm.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def vit(name: str, device, dtype, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval().to(device, dtype)


# ------------------------------------------------------------------------------------------
# 1. correctness
# ------------------------------------------------------------------------------------------

def correctness(chk: Check, name: str, batch: int, r: int, **kw):
    device = chk.device
    model = vit(name, device, torch.float32, **kw)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, *model.patch_embed.img_size, device=device)
    schedule = reference_schedule(r, len(model.blocks))
    with torch.no_grad():
        want = reference_forward(model, x, schedule).float()
    scale = want.abs().max().item()
    for form in ("bias", "fold"):
        fast = tome_fx.optimize(model, r=r, example_inputs=(x,), prop_attn=form, drop_unread=False)
        with torch.no_grad():
            rel = (fast(x).float() - want).abs().max().item() / scale
            # a copy: the result computes with the model's own weights, which stay fp32 here
            bf = copy.deepcopy(fast).to(torch.bfloat16)(x.to(torch.bfloat16)).float()
        cos = F.cosine_similarity(bf, want, dim=-1).min().item()
        row = {"model": name, "batch": batch, "r": r, "form": form, "fp32_rel_diff": rel,
               "bf16_min_cosine": cos, "ok": rel <= 1e-4 and cos >= 0.999}
        chk.data["correctness"].append(row)
        print(f"correctness {name} {form}: fp32 rel {rel:.2e}, bf16 cosine {cos:.5f}", flush=True)
    chk.save()


# ------------------------------------------------------------------------------------------
# 2-4. throughput, kernels, memory, merge share
# ------------------------------------------------------------------------------------------

def variants(chk: Check, model, x, budget: float, modes, backend: str) -> dict:
    """name -> (module, FLOP ratio) for the original, the reference and both tome_fx forms."""
    out = {}
    x1 = x[:1]
    base = counted_flops(model, x1)
    bias = tome_fx.optimize(model, flops_budget=budget, example_inputs=(x1,), prop_attn="bias")
    fold = tome_fx.optimize(model, flops_budget=budget, example_inputs=(x1,), prop_attn="fold")
    ref = apply_tome(model, list(bias.tome.r))
    for mode in modes:
        def wrap(m, ours=False):
            if mode == "eager":
                return m
            return compile_module(m, {"backend": backend}) if ours else torch.compile(m,
                                                                                     backend=backend)

        out[f"original/{mode}"] = (wrap(model), 1.0, None)
        out[f"reference@{budget:g}/{mode}"] = (wrap(ref), counted_flops(ref, x1) / base,
                                               list(bias.tome.r))
        out[f"tome_fx-bias@{budget:g}/{mode}"] = (wrap(bias, True), bias.tome.ratio,
                                                  list(bias.tome.r))
        out[f"tome_fx-fold@{budget:g}/{mode}"] = (wrap(fold, True), fold.tome.ratio,
                                                  list(fold.tome.r))
    return out


def timed(chk: Check, mods: dict, x, runs: int, warmup: int) -> dict:
    """Median seconds per call of each module, round-robin; compile time of first calls."""
    device, first, times = chk.device, {}, {k: [] for k in mods}
    with torch.inference_mode():
        for k, (m, _, _) in mods.items():
            sync(device)
            t = time.perf_counter()
            m(x)
            sync(device)
            first[k] = time.perf_counter() - t
        for _ in range(warmup):
            for m, _, _ in mods.values():
                m(x)
        names = list(mods)
        for i in range(runs):
            for k in names[i % len(names):] + names[:i % len(names)]:
                sync(device)
                t = time.perf_counter()
                mods[k][0](x)
                sync(device)
                times[k].append(time.perf_counter() - t)
    return {k: (statistics.median(v), first[k]) for k, v in times.items()}


def kernels_and_memory(chk: Check, mods: dict, x):
    device = chk.device
    for k, (m, _, _) in mods.items():
        if k in chk.data["kernels"]:
            continue
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode(), torch.profiler.profile(activities=acts) as prof:
            m(x)
            sync(device)
        names = sorted({e.name for e in prof.events()
                        if any(w in e.name.lower() for w in ATTENTION_WORDS)})
        chk.data["kernels"][k] = names[:12]
        if device.type == "cuda":
            chk.data["memory_mb"][k] = torch.cuda.max_memory_allocated(device) / 2**20


def speed(chk: Check, name: str, batch: int, budget: float, modes, runs: int, warmup: int,
          backend: str, cache: dict, **kw):
    """Time every variant of ``name`` at ``budget``; the model, its input and the compiled
    original are built once per model (``cache``)."""
    device, dtype = chk.device, chk.dtype
    if name not in cache:
        model = vit(name, device, dtype, **kw)
        torch.manual_seed(1)
        x = torch.randn(batch, 3, *model.patch_embed.img_size, device=device, dtype=dtype)
        cache.clear()  # one model in memory at a time
        cache[name] = (model, x, {})
    model, x, originals = cache[name]
    mods = variants(chk, model, x, budget, modes, backend)
    for key in [k for k in mods if k.startswith("original/")]:  # compile the original once
        mods[key] = originals.setdefault(key, mods[key])
    res = timed(chk, mods, x, runs, warmup)
    base = {mode: res[f"original/{mode}"][0] for mode in modes}
    for k, (med, first) in res.items():
        mode = k.rsplit("/", 1)[1]
        chk.data["speed"].append({
            "model": name, "batch": batch, "budget": budget, "variant": k, "mode": mode,
            "images_per_s": batch / med, "speedup": base[mode] / med, "flop_ratio": mods[k][1],
            "schedule": mods[k][2], "first_call_s": first, "runs": runs})
        print(f"{name} b{batch} {k:28s} {batch / med:9.1f} img/s  x{base[mode] / med:.3f}  "
              f"first call {first:.1f} s", flush=True)
    kernels_and_memory(chk, mods, x)
    chk.save()
    return mods, x


def merge_share(chk: Check, mods: dict, x, budget: float, runs: int):
    """Share of tome_fx (bias, eager) forward time in matching + merging: stubbed merges."""
    device = chk.device
    full = mods[f"tome_fx-bias@{budget:g}/eager"][0]
    stub = stubbed(full)
    times = {"full": [], "stub": []}
    with torch.inference_mode():
        full(x), stub(x)
        for _ in range(runs):
            for k, m in (("full", full), ("stub", stub)):
                sync(device)
                t = time.perf_counter()
                m(x)
                sync(device)
                times[k].append(time.perf_counter() - t)
    f, s = statistics.median(times["full"]), statistics.median(times["stub"])
    chk.data["merge_share"].append({"budget": budget, "full_s": f, "stub_s": s,
                                    "share": (f - s) / f})
    print(f"matching + merging: {(f - s) / f:.1%} of the forward", flush=True)
    chk.save()


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

def markdown(d: dict) -> str:
    e = d["env"]
    lines = [f"# GPU check: {e['device']}", "",
             f"torch {e['torch']}, timm {e['timm']}, CUDA {e['cuda']}, cuDNN {e['cudnn']}; "
             f"{d.get('elapsed_s', 0):.0f} s of {d['seconds']:.0f}; `{e['command']}`", "",
             "## Correctness (tome_fx vs the independent reference ToMe)", "",
             "| model | batch | r | form | fp32 max diff / scale | bf16 min cosine | ok |",
             "|---|---|---|---|---|---|---|"]
    for c in d["correctness"]:
        lines.append(f"| {c['model']} | {c['batch']} | {c['r']} | {c['form']} | "
                     f"{c['fp32_rel_diff']:.2e} | {c['bf16_min_cosine']:.5f} | {c['ok']} |")
    lines += ["", "## Throughput", "",
              "| model | batch | variant | images/s | speed-up (same mode) | FLOP ratio | "
              "first call s | peak MB | attention kernels |", "|---|---|---|---|---|---|---|---|---|"]
    for s in d["speed"]:
        mem = d["memory_mb"].get(s["variant"])
        kern = ", ".join(d["kernels"].get(s["variant"], []))[:160]
        lines.append(f"| {s['model']} | {s['batch']} | {s['variant']} | {s['images_per_s']:.1f} "
                     f"| {s['speedup']:.3f} | {s['flop_ratio']:.4f} | {s['first_call_s']:.1f} | "
                     f"{'' if mem is None else f'{mem:.0f}'} | {kern} |")
    for m in d["merge_share"]:
        lines += ["", f"Matching + merging: {m['share']:.1%} of tome_fx's eager forward at budget "
                      f"{m['budget']:g} ({m['full_s'] * 1e3:.2f} ms vs {m['stub_s'] * 1e3:.2f} ms "
                      "with the merges stubbed)."]
    if d["skipped"]:
        lines += ["", "Not run (time): " + "; ".join(d["skipped"])]
    lines += ["", f"Targets ({TARGETS}): compiled tome_fx >= 1.8x compiled original, eager >= "
                  "1.7x; tome_fx >= the reference in every mode; a fused attention kernel; "
                  "matching + merging <= 5%."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=400, help="time box for the whole check")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true",
                   help="tiny models and batches on this machine's device: a dry run")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    chk = Check(Path(a.out), a.seconds, device, dtype)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 comparison means fp32
        plan = [("vit_base_patch16_224", 256, {}), ("vit_large_patch16_224", 128, {})]
        backend, small = "inductor", {}
    else:  # smoke: the first step of each kind, tiny
        plan = [("vit_tiny_patch16_224", 4, {"img_size": 64, "depth": 3})]
        backend, small = "eager", {"img_size": 64, "depth": 3}
        a.runs, a.warmup = min(a.runs, 2), min(a.warmup, 1)
    chk.save()
    correctness(chk, plan[0][0] if cuda else "vit_tiny_patch16_224", 4, 8, **small)
    # (model, batch, budget, modes), most important first; the compile estimate grows with use
    steps = []
    for name, batch, kw in plan:
        steps += [(name, batch, 0.5, ["compiled", "eager"], kw), (name, batch, 0.75,
                                                                  ["compiled", "eager"], kw)]
    need, cache = (150.0, {}) if cuda else (5.0, {})
    for i, (name, batch, budget, modes, kw) in enumerate(steps if cuda else steps[:1]):
        if not chk.fits(f"{name} b{batch} at {budget:g}", need):
            continue
        t = time.perf_counter()
        mods, x = speed(chk, name, batch, budget, modes, a.runs, a.warmup, backend, cache, **kw)
        if i == 0:
            merge_share(chk, mods, x, budget, a.runs)
        need = max(need, time.perf_counter() - t)
        del mods, x
        if cuda:
            torch.cuda.empty_cache()
    chk.save()
    print(f"wrote {chk.out}/gpu_check.json and gpu_check.md", flush=True)
    return chk.data


if __name__ == "__main__":
    main()
