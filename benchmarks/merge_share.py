"""Share of tome_fx run time spent in matching + merging (and in the size bias / pooling).

Two measurements of the same rewritten model on the same inputs (eager):

1. profiler: every op tome_fx inserted runs inside a ``record_function`` range; the share is the
   ranges' CPU time over the whole forward's.
2. ablation (wall clock): the same graph with each merge replaced by a stub that keeps the first
   ``N - r`` tokens (same shapes downstream, no matching, no gather/scatter). The share is
   ``(t_full - t_stub) / t_full``, medians over interleaved runs.

    python benchmarks/merge_share.py --model vit_small_patch16_224 --budget 0.5 --batch 16
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
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's tome_fx first
import timm  # noqa: E402

import tome_fx  # noqa: E402
from tome_fx.kernels import tome as ops  # noqa: E402

RANGES = {"merge": "tome.merge", "bias": "tome.bias", "pool": "tome.pool"}


def _ranged(fn, name):
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    wrapper.__name__ = f"ranged_{fn.__name__}"
    return wrapper


def _stub_merge(x, keys, size, r, prefix, keys_transposed=False, origin=None, groups=None,
                start=None):
    """Same output shapes as ops.tome_merge, none of its work."""
    n = min(ops.merge_count(r, x.shape[1], prefix, start), ops.merge_limit(x.shape[1], prefix))
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, dtype=torch.float32, device=x.device)
    keep = x.shape[1] - max(n, 0)
    return x[:, :keep], size[:, :keep]


def with_targets(gm, replace):
    """A copy of ``gm`` whose inserted calls are replaced: ``replace(node) -> callable | None``."""
    out = copy.deepcopy(gm)
    for n in out.graph.nodes:
        if n.op == "call_function" and n.meta.get("tome", {}).get("inserted"):
            new = replace(n)
            if new is not None:
                n.target = new
    out.recompile()
    return out


def ranged(gm):
    def pick(n):
        role = n.meta["tome"]["role"]
        name = RANGES.get(role)
        return _ranged(n.target, name) if name else None

    return with_targets(gm, pick)


def stubbed(gm):
    return with_targets(gm, lambda n: _stub_merge if n.target is ops.tome_merge else None)


def profile_share(gm, x, reps: int = 3) -> dict:
    with torch.inference_mode():
        gm(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                with record_function("tome.forward"):
                    gm(x)
    totals = {}
    for ev in prof.key_averages():
        if ev.key.startswith("tome."):
            totals[ev.key] = ev.cpu_time_total
    whole = totals.pop("tome.forward")
    return {k.split(".")[1]: v / whole for k, v in totals.items()}


def ablation_share(gm, stub, x, runs: int, clock=time.perf_counter) -> dict:
    times = {"full": [], "stub": []}
    with torch.inference_mode():
        gm(x), stub(x)
        for _ in range(runs):
            for name, f in (("full", gm), ("stub", stub)):
                t = clock()
                f(x)
                times[name].append(clock() - t)
    full, st = statistics.median(times["full"]), statistics.median(times["stub"])
    return {"full_s": full, "stub_s": st, "share": (full - st) / full}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time, steadier than wall time on a shared machine")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    torch.manual_seed(0)
    kw = {} if a.img_size is None else {"img_size": a.img_size}
    model = timm.create_model(a.model, pretrained=False, **kw).eval()
    res = model.patch_embed.img_size
    x1 = torch.randn(1, 3, *res)
    gm = tome_fx.optimize(model, flops_budget=a.budget, example_inputs=(x1,))
    x = torch.randn(a.batch, 3, *res)
    prof = profile_share(ranged(gm), x)
    abl = ablation_share(gm, stubbed(gm), x, a.runs, clock)
    out = {
        "model": a.model, "img_size": list(res), "budget": a.budget, "batch": a.batch,
        "schedule": list(gm.tome.r), "flop_ratio": gm.tome.ratio,
        "profiler_share": prof, "ablation": abl, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "clock": a.clock,
    }
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
