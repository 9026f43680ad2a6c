"""What ``tome-fx report`` shows: plan, FLOPs before/after per block, fidelity, throughput.

``build(...)`` returns a plain dict (what ``--format json`` prints); ``format_text`` renders it
as a table (tabulate ``simple``) or markdown (tabulate ``github``).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from .. import cost
from ..capture import capture
from ..cost.floor import apply_floor, resolve_min_tokens
from ..graph.batches import batched
from ..rules import ToMe
from ..api import check_calibration
from ..pipeline import rewrite
from ..schedule import parse_r
from ..sweep import check_labels, main_output, outputs, scores
from ..timing import call


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fidelity(ref: Any, out: Any) -> dict:
    """Cosine similarity per sample of rewritten vs original outputs; top-1 agreement for
    classifier outputs ([batch, classes]). Dimensions merging shortened are averaged out."""
    a, b = main_output(ref).float(), main_output(out).float()
    if a.dim() == b.dim():
        dims = tuple(d for d in range(a.dim()) if a.shape[d] != b.shape[d])
        if dims:
            a, b = a.mean(dims, keepdim=True), b.mean(dims, keepdim=True)
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    cos = F.cosine_similarity(a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double(), dim=-1)
    res = {"samples": len(a), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
           "top1_agreement": None}
    if a.dim() == 2 and a.shape[1] > 1:
        res["top1_agreement"] = float((a.argmax(-1) == b.argmax(-1)).double().mean())
    return res


def data_fidelity(model, fast, data, batch_size: int = 64, bar=None) -> dict:
    """``fidelity`` over every input of ``data`` (a ``tome_fx.Data``), batch by batch; with
    labels, top-1 of both models too."""
    steps = -(-len(data) // batch_size)
    with bar(2 * steps, "fidelity") if bar else contextlib.nullcontext() as b:
        ref, logits = outputs(model, data, batch_size, b)
        emb = outputs(fast, data, batch_size, b)[0]
    check_labels(data, ref, logits)
    got = scores(ref, emb, data, logits=logits)
    res = {"inputs": f"real ({data.source})", "samples": len(data), "cosine_mean": got["cosine"],
           "cosine_min": got["cosine_min"], "top1_agreement": None}
    if "agreement" in got:
        res["top1_agreement"] = got["agreement"] / 100
    if "top1" in got:
        res["top1"] = {"original": got["top1_original"], "rewritten": got["top1"]}
    if "nn_agreement" in got:
        res["nn_agreement"] = got["nn_agreement"] / 100
    return res


def build(target: Any, model: nn.Module, inputs, *, r: Any = None,
          flops_budget: float | None = None, strategy: str = "auto", calibration=None,
          evaluate=None, bar=None, min_tokens="auto"):
    """(report dict, rewritten module). ``target`` goes to the tome_fx API, ``model`` runs the
    original. The schedule is ``tome_fx.plan``'s for a budget (same cost model and search, on
    ``calibration`` inputs when given), or ``r`` as ``optimize`` reads it. Fidelity is measured
    on ``evaluate`` (a ``tome_fx.Data``) when given, else on ``inputs``."""
    captured = capture(target, inputs)
    cm = cost.CostModel.build(captured)
    cm.floor = resolve_min_tokens(min_tokens, (captured.args, captured.kwargs))
    drift, notes = None, []
    if flops_budget is not None:
        calib = check_calibration(captured, calibration)
        schedule, drift = cost.search(cm, cost.check_budget(flops_budget), strategy, notes, calib)
    else:
        schedule = cm.clamp(parse_r(r, cm.num_blocks))
    rw = apply_floor(rewrite(captured, ToMe(lambda n: list(schedule) + [0] * (n - len(schedule)))),
                     cm.floor)
    fast = rw.graph_module
    notes += [n for n in rw.plan.notes if n.startswith("min_tokens=")]
    plan = cost.to_plan(cm, rw.plan.r, flops_budget,
                        strategy if flops_budget is not None else None, drift, notes)
    fast.tome, fast.tome_counts = plan, rw.counts
    before, outside_before = cm.breakdown_original()
    after, outside_after = cm.breakdown(plan.r)
    run_model, run_fast = batched(model), batched(fast)  # a static batch: calls of that size
    if evaluate is not None:
        measured = data_fidelity(run_model, run_fast, evaluate, bar=bar)
    else:
        with torch.no_grad():
            measured = {"inputs": "random",
                        **fidelity(call(run_model, inputs), call(run_fast, inputs))}
    params = count_params(model), count_params(fast)
    data = {
        "source": None,
        "model_class": type(model).__name__,
        "frontend": plan.frontend,  # how the graph was captured (fx symbolic tracing, export)
        "input_shape": [list(t.shape) for t in (inputs.values() if isinstance(inputs, dict)
                                                else inputs) if isinstance(t, torch.Tensor)],
        "request": {"flops_budget": flops_budget, "r": None if flops_budget is not None else r,
                    "strategy": plan.strategy},
        "blocks": [
            {"block": b.index, "site": b.site, "attention": b.kind, "norm": b.norm,
             "tokens_in": b.tokens_in, "tokens_out": b.tokens_out, "r": b.r,
             "flops_before": int(round(before[i])), "flops_after": b.flops}
            for i, b in enumerate(plan.blocks)
        ],
        "protected_tokens": plan.protected,
        "skipped": [{"site": s.site, "reason": s.reason} for s in plan.skipped],
        "notes": list(rw.notes) + notes,
        "rewrites": dict(rw.counts),
        "totals": {
            "flops_before": plan.flops_original, "flops_after": plan.flops,
            "flops_outside_blocks_before": int(round(outside_before)),
            "flops_outside_blocks_after": int(round(outside_after)),
            "flop_ratio": plan.ratio, "predicted_speedup": plan.predicted_speedup,
            "params_original": params[0], "params_rewritten": params[1],
            "params_unchanged": params[0] == params[1],
        },
        "drift": drift,
        "fidelity": measured,
        "bench": None,
    }
    return data, fast


def _m(flops) -> float:
    return flops / 1e6


def format_text(data: dict, fmt: str = "table") -> str:
    md = fmt == "markdown"
    tablefmt = "github" if md else "simple"
    rows = [[b["block"], b["site"], f"{b['attention']}, {b['norm']}-norm",
             f"{b['tokens_in']} -> {b['tokens_out']}", b["r"], _m(b["flops_before"]),
             _m(b["flops_after"])] for b in data["blocks"]]
    t = data["totals"]
    rows.append(["", "outside blocks", "", "", "", _m(t["flops_outside_blocks_before"]),
                 _m(t["flops_outside_blocks_after"])])
    rows.append(["", "total", "", "", sum(b["r"] for b in data["blocks"]), _m(t["flops_before"]),
                 _m(t["flops_after"])])
    head = ["block", "attention site", "kind", "tokens in -> out", "r", "MFLOPs before",
            "MFLOPs after"]
    shape = " ".join("x".join(map(str, s)) for s in data["input_shape"])
    req = data["request"]
    what = (f"flops budget {req['flops_budget']:g} (strategy {req['strategy']})"
            if req["flops_budget"] is not None else f"r = {req['r']}")
    capped = "capped" in (req.get("applied") or "")
    if capped:
        what += f" (capped per block: {' '.join(str(b['r']) for b in data['blocks'])})"
    bullet = "- " if md else ""
    lines = []
    title = (f"tome-fx report: {data['source']} ({data['model_class']}, captured with "
             f"{data['frontend']}), input {shape}, {what}")
    lines += [f"## {title}", ""] if md else [title, ""]
    lines += [tabulate(rows, headers=head, tablefmt=tablefmt, floatfmt=".1f"), ""]
    if capped:
        lines.append(f"{bullet}{req['applied']}")
    lines.append(f"{bullet}protected prefix tokens (never merged): {data['protected_tokens']}")
    if data["skipped"]:
        lines.append(f"{bullet}skipped sites:")
        lines += [f"  - {s['site']}: {s['reason']}" for s in data["skipped"]]
    else:
        lines.append(f"{bullet}skipped sites: none")
    for note in data["notes"]:
        lines.append(f"{bullet}note: {note}")
    counts = data["rewrites"]
    lines.append(f"{bullet}rewrites: {counts.get('merges', 0)} merges, {counts.get('size_bias', 0)} "
                 f"proportional-attention biases, {counts.get('weighted_pool', 0)} weighted pools")
    unchanged = "unchanged" if t["params_unchanged"] else "CHANGED"
    lines.append(f"{bullet}FLOPs: {t['flops_before'] / 1e9:.4g} G -> {t['flops_after'] / 1e9:.4g} G "
                 f"(ratio {t['flop_ratio']:.4f}, predicted speed-up {t['predicted_speedup']:.2f}x); "
                 f"parameters {t['params_original']:,} -> {t['params_rewritten']:,} ({unchanged})")
    f = data["fidelity"]
    top1 = "" if f["top1_agreement"] is None else f", top-1 agreement {f['top1_agreement']:.1%}"
    if f.get("top1"):
        top1 += (f", top-1 accuracy {f['top1']['original']:.2f}% -> "
                 f"{f['top1']['rewritten']:.2f}%")
    if f.get("nn_agreement") is not None:
        top1 += f", nearest-neighbour agreement {f['nn_agreement']:.1%}"
    lines.append(f"{bullet}fidelity on {f['samples']} {f['inputs']} inputs: output cosine similarity "
                 f"{f['cosine_mean']:.4f} (min {f['cosine_min']:.4f}){top1}")
    if f["inputs"] == "random":
        lines.append(f"{bullet}these inputs are random, not your data: pass --data PATH (image "
                     f"folder, .npz, or .txt for text models) for fidelity and calibration on "
                     f"real inputs")
    b = data.get("bench")
    if b:
        lines.append(f"{bullet}throughput on {b['device']} ({b['dtype']}, batch {b['batch']}, median of "
                     f"{b['runs']} runs): original {b['original']:.1f}/s, rewritten "
                     f"{b['rewritten']:.1f}/s, measured speed-up {b['speedup']:.2f}x")
    return "\n".join(lines)
