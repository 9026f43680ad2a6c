"""Accuracy against compute on the user's own data: ``tome_fx.sweep``.

    result = tome_fx.sweep(model, tome_fx.load_data("val/", model), budgets=(1, 0.75, 0.5))
    print(result)                  # a table per strategy and budget
    result.plot("sweep.png")       # accuracy vs FLOP ratio and vs throughput (the paper's figure)

For each strategy and budget: ``optimize(model, flops_budget=b, calibration=...)``, then every
evaluation input through both models. Per row: the FLOP ratio, top-1 (with labels), agreement
with the original's predictions (classifier outputs), mean output cosine, nearest-neighbour
agreement (token outputs, mean-pooled over the padding mask: sentence embeddings) and measured
throughput. The default strategy is compared with constant r on the same inputs, image by
image (exact McNemar test).
"""
from __future__ import annotations

import itertools
import os
import statistics
from typing import Any

import torch
import torch.nn.functional as F

from . import api
from .capture import is_exported_program
from .data import Data, DataError, Listing, open_data
from .distributed import TIMEOUT, Group, session
from .graph.batches import InBatches, batched, fit_batch, static_batch
from .results import DEFAULT, Pair, Row, SweepResult, bits, mcnemar, pairs  # noqa: F401
from .timing import batch_size as batch_of
from .timing import busy_cpu, call, compare, progress, throughput, to_device

BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
STRATEGIES = ("auto", "constant")

# ---------------------------------------------------------------------------------------------

def main_output(out: Any) -> torch.Tensor:
    """The tensor a model's output is judged by: logits, else the first floating tensor."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise DataError(f"cannot find an output tensor in a {type(out).__name__}")


def pooled(out: Any, inputs: Any) -> torch.Tensor:
    """One vector per input: the main output ([B, D] as it is; [B, N, D] averaged over the
    tokens the padding mask keeps)."""
    y = main_output(out).float()
    if y.dim() == 3:
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        m = torch.ones(y.shape[:2], device=y.device) if mask is None else mask.to(y)
        return (y * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
    return y.reshape(len(y), -1)


@torch.no_grad()
def outputs(module, data: Data, batch_size: int, bar=None,
            device: torch.device | None = None) -> tuple[torch.Tensor, bool]:
    """(``pooled`` outputs of ``module`` over ``data``, in order, [N, D], on the CPU; whether
    they are ``.logits`` of one score vector per input: a HuggingFace classifier, text ones
    included). ``device``: where the inputs go (the module's)."""
    out, logits = [], False
    for inputs, _ in data.batches(batch_size):
        inputs = inputs if device is None else to_device(inputs, device)
        y = call(module, inputs)
        logits = isinstance(getattr(y, "logits", None), torch.Tensor) and y.logits.dim() == 2
        out.append(pooled(y, inputs).cpu())
        if bar is not None:
            bar.update()
    return torch.cat(out), logits


def _nearest(e: torch.Tensor) -> torch.Tensor:
    e = F.normalize(e.double(), dim=-1)
    found = []
    for i in range(0, len(e), 1024):
        sim = e[i:i + 1024] @ e.T
        sim[torch.arange(len(sim)), torch.arange(i, i + len(sim))] = -float("inf")
        found.append(sim.argmax(-1))
    return torch.cat(found)


def is_classifier(ref: torch.Tensor, data: Data, logits: bool = False) -> bool:
    """One score per class, judged by top-1: an image model's [B, classes] output or a
    classifier's ``.logits`` (``outputs``); otherwise (embeddings) nearest-neighbour agreement."""
    return (logits or data.kind == "images") and ref.dim() == 2 and ref.shape[1] > 1


def check_labels(data: Data, ref: torch.Tensor, logits: bool = False) -> None:
    if (data.labels is not None and is_classifier(ref, data, logits)
            and int(data.labels.max()) >= ref.shape[1]):
        raise DataError(f"labels of {data.source} go up to {int(data.labels.max())}, but the "
                        f"model outputs {ref.shape[1]} classes")


_ROW_SCORES = ("cosine", "top1", "agreement", "nn_agreement", "right")


def scores(ref: torch.Tensor, emb: torch.Tensor, data: Data,
           ref_nearest: torch.Tensor | None = None, logits: bool = False) -> dict:
    """Rewritten outputs ``emb`` against the original's ``ref`` (``outputs``, same inputs):
    cosine (mean, min); for classifiers (``is_classifier``) agreement % and, with labels, top-1 %
    of both and which inputs the rewritten one gets right; else nearest-neighbour agreement %
    (``ref_nearest``: ``ref``'s nearest neighbours, when already computed)."""
    cos = F.cosine_similarity(emb.double(), ref.double(), dim=-1)
    out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}
    if is_classifier(ref, data, logits):
        p = emb.argmax(-1)
        out["agreement"] = 100 * float((p == ref.argmax(-1)).double().mean())
        if data.labels is not None:
            out["top1"] = 100 * float((p == data.labels).double().mean())
            out["top1_original"] = 100 * float((ref.argmax(-1) == data.labels).double().mean())
            out["right"] = bits(p == data.labels)
    elif len(ref) > 1:
        near = _nearest(ref) if ref_nearest is None else ref_nearest
        out["nn_agreement"] = 100 * float((_nearest(emb) == near).double().mean())
    return out


def _variants(strategies) -> dict[str, dict]:
    """name -> optimize keyword arguments: a strategy name, or a dict of such entries."""
    if isinstance(strategies, dict):
        return {str(k): dict(v) for k, v in strategies.items()}
    if isinstance(strategies, str):
        strategies = [s for s in strategies.split(",") if s.strip()]
    return {s: {"strategy": s} for s in strategies}


def _calibration(data, calibration, model) -> tuple[Any, Any, str]:
    """(evaluation data, calibration data or None, how calibration was done): each a ``Data``
    or a ``Listing`` not yet decoded."""
    if isinstance(calibration, (Data, Listing, str, os.PathLike)):
        calib = (calibration if isinstance(calibration, (Data, Listing))
                 else open_data(calibration, model))
        return data, calib, f"{len(calib)} inputs of {calib.source}"
    if not calibration:
        return data, None, "none (the data-free rule)"
    calib, rest = data.split(int(calibration))
    return rest, calib, f"{len(calib)} inputs of {data.source} (seeded, not evaluated)"


def _loaded(data) -> Data:
    return data.load() if isinstance(data, Listing) else data


def device_of(module) -> torch.device:
    """Where ``module`` (an ``nn.Module`` or an ``ExportedProgram``) keeps its tensors."""
    tensors = (module.state_dict.values() if is_exported_program(module)
               else itertools.chain(module.parameters(), module.buffers()))
    first = next(iter(tensors), None)
    return first.device if first is not None else torch.device("cpu")


def _summed(speeds: list[dict]) -> dict:
    """Items/s of every process, timed at the same time, added up."""
    original, rewritten = (sum(s[k] for s in speeds) for k in ("original", "rewritten"))
    return {"original": original, "rewritten": rewritten, "speedup": rewritten / original}


def _share(group: Group, data, batch_size: int) -> range:
    """The items this process evaluates: whole batches, as one process batches them (so every
    output is computed as there), dealt to the processes in contiguous runs."""
    batches = -(-len(data) // batch_size)
    mine = group.share(batches)
    if not mine:
        raise DataError(f"nothing to evaluate: {len(data)} evaluation input(s) of {data.source} "
                        f"make {batches} batch(es) of {batch_size}, fewer than the {group.world} "
                        f"processes (start at most {batches}, or lower the batch size)")
    return range(mine.start * batch_size, min(mine.stop * batch_size, len(data)))


def sweep(model, data, budgets=BUDGETS, strategies=STRATEGIES, *, calibration: Any = 64,
          batch_size: int = 64, measure: bool = True, warmup: int = 2, runs: int = 5,
          quiet: bool | None = None, name: str | None = None, original=None, bar_stream=None,
          timeout: float = TIMEOUT, **optimize_kwargs) -> SweepResult:
    """Every strategy at every budget on ``data`` (a ``Data``, a ``Listing`` from ``open_data``,
    or a path for ``open_data``).

    ``calibration``: an int takes that many inputs of ``data`` (a seeded random subset, left
    out of the evaluation) to plan on; a ``Data`` or path is a separate calibration set; 0 or
    None plans without data (``auto``'s data-free rule). ``strategies``: names for
    ``optimize(strategy=...)``, or ``{label: optimize kwargs}``. ``measure``: throughput of
    each module on the first evaluation batch, timed in the same rounds as the original
    (``timing.compare``: warm-up, then the median of ``runs``); the original's row has the
    median of its rates over those pairings.
    ``quiet``: no progress bars (default: bars only on a terminal; ``bar_stream``, stderr).
    ``original``: the module that runs the original (default ``model``; for an
    ``ExportedProgram``, its ``.module()``). A program saved with a static batch, and what is
    captured from it, run ``batch_size`` items as calls of that batch (``graph.batches``).
    Inputs go to the device of ``original``; the rewritten modules follow it.
    Other keyword arguments go to ``optimize``.

    Under ``torchrun`` (or in a process group the caller initialised, which is left as it is)
    every process evaluates a contiguous share of the evaluation batches: rank 0 plans each
    module and the others build the one it planned (``optimize(planned=...)``), rank 0 gathers
    the outputs in data order and scores them, so every number but throughput is the one
    process's; throughput is the sum of the processes' rates, timed at the same time. Every
    process returns the result; bars are rank 0's. A process that fails stops them all with a
    ``DistributedError`` naming it (``tome_fx.distributed``); one that keeps the others waiting
    more than ``timeout`` seconds (stuck, or gone) stops them with one too."""
    if original is None:
        original = model.module() if is_exported_program(model) else model
    budgets = sorted({float(api.check_budget(b)) for b in budgets} | {1.0}, reverse=True)
    variants = _variants(strategies)
    with session(device_of(original), timeout) as group:
        return _sweep(group, model, original, data, budgets, variants, calibration, batch_size,
                      measure, warmup, runs, quiet if group.main else True, name, bar_stream,
                      optimize_kwargs)


def _sweep(group: Group, model, original, data, budgets, variants, calibration, batch_size,
           measure, warmup, runs, quiet, name, bar_stream, optimize_kwargs) -> SweepResult:
    device = device_of(original)
    threads = torch.get_num_threads()  # tome-fx sweep --threads sets it
    # before the sweep's own work: the load of other processes
    busy = busy_cpu(threads) if measure and device.type == "cpu" else None
    fixed = static_batch(model)
    run_original = batched(original) if fixed is None else InBatches(original, fixed)
    with group.step() as counted:
        if isinstance(data, (str, os.PathLike)):
            data = open_data(data, original)
        data, calib, how = _calibration(data, calibration, original)
        counted.value = len(data)
    if len(set(counted.values)) > 1:
        counts = ", ".join(f"{n} on rank {r}" for r, n in enumerate(counted.values))
        raise DataError(f"the processes see different data in {data.source} ({counts} "
                        f"evaluation inputs): every machine needs the same copy")
    with group.step():  # each process decodes its share; rank 0 the inputs it plans on
        share = _share(group, data, batch_size)
        mine = _loaded(data if len(share) == len(data) else data.subset(list(share)))
        first = to_device(mine.inputs(0, batch_size), device)
        plan_inputs = None
        if group.main:
            planning = calib if calib is not None else data.subset(list(range(min(len(data), 2))))
            plan_inputs = _loaded(planning).inputs()
    plan_inputs = to_device(group.broadcast(plan_inputs), device_of(model))
    plan_kw = {"calibration": plan_inputs} if calib is not None else {"example_inputs": plan_inputs}
    if fixed is not None:  # captured at its one batch; calibration runs in chunks of it
        plan_kw["example_inputs"] = fit_batch(plan_inputs, fixed)
    steps = -(-len(mine) // batch_size)
    bar = progress(steps * (1 + len(variants) * (len(budgets) - 1)), "sweep", quiet, bar_stream)
    with group.step():
        ref, logits = outputs(run_original, mine, batch_size, bar, device)
    parts = group.gather(ref)
    with group.step():
        if group.main:
            ref = torch.cat(parts)
            check_labels(data, ref, logits)
            near = None if is_classifier(ref, data, logits) or len(ref) < 2 else _nearest(ref)
    rows, seen, base_speeds = [], {}, []

    def row(label, budget, ratio, r, emb, speed=None, speedup=None):
        kw = {k: v for k, v in scores(ref, emb, data, near, logits).items() if k in _ROW_SCORES}
        return Row(label, budget, ratio, r, items_per_s=speed, speedup=speedup, **kw)

    def timed(fn):  # every process times its first batch at the same time; rates add up
        with group.step() as step:
            step.value = fn()
        return step.values

    for budget in budgets[1:]:
        for label, kw in variants.items():
            bar.set_description(f"{label} at {budget:g}")
            args = dict(**plan_kw, **optimize_kwargs, **kw)  # a clash is a TypeError
            with group.step():
                fast = api.optimize(model, flops_budget=budget, **args) if group.main else None
            plan = group.broadcast(None if fast is None else fast.tome)
            key = (tuple(plan.r), repr(sorted((k, v) for k, v in kw.items() if k != "strategy")))
            with group.step():
                if fast is None:
                    fast = _rebuild(group, model, budget, plan, args)
                fast = batched(fast).to(device)
                emb = None if key in seen else outputs(fast, mine, batch_size, bar, device)[0]
                if key in seen:  # same schedule, same rewrite: same outputs
                    bar.update(steps)
            speed = (_summed(timed(lambda: compare(run_original, fast, first, warmup, runs)))
                     if measure else {})
            if key not in seen:
                seen[key] = group.gather(emb)
            base_speeds += [speed["original"]] if speed else []
            with group.step():
                if group.main:
                    rows.append(row(label, budget, plan.ratio, tuple(plan.r), torch.cat(seen[key]),
                                    speed.get("rewritten"), speed.get("speedup")))
    base = None
    if measure:
        base = (statistics.median(base_speeds) if base_speeds else
                sum(timed(lambda: throughput(run_original, first, warmup, runs))))
    bar.close()
    result = None
    with group.step():
        if group.main:
            rows.insert(0, row("original", 1.0, 1.0, None, ref, base,
                               None if base is None else 1.0))
            result = SweepResult(
                name or type(original).__name__, data.source, len(data), how, tuple(rows),
                pairs(rows, len(data)), batch_of(first) if measure else None, group.world,
                tuple(len(p) for p in parts), _rate_note(group, first, warmup, runs, measure,
                                                         threads, busy),
                threads if measure else None)
    return group.broadcast(result)


def _rebuild(group: Group, model, budget: float, plan, args: dict):
    """The module rank 0 planned, built here: ToMe from its plan (no search); ToMato plans from
    shapes alone, so the same call gives the same module."""
    if plan.method == "tome":
        fast = api.optimize(model, flops_budget=budget, planned=plan, **args)
    else:
        fast = api.optimize(model, flops_budget=budget, **args)
    if fast.tome.r != plan.r:
        raise ValueError(f"rank {group.rank} built a module merging {fast.tome.r} per block, "
                         f"not the {plan.r} rank 0 planned")
    return fast


def _rate_note(group: Group, first, warmup: int, runs: int, measure: bool, threads: int,
               busy: str | None) -> str | None:
    if not measure:
        return None
    how = (f"items/s on the first batch ({batch_of(first)} inputs), median of {runs} runs after "
           f"{warmup} warm-up, each module in the same rounds as the original, {threads} CPU "
           f"thread(s){' per process' if group.world > 1 else ''}")
    if group.world > 1:
        how += f"; the sum over {group.world} processes, each timing its own first batch at once"
    return how + (f"; warning: {busy}" if busy else "")
