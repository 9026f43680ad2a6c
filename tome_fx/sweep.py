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

import dataclasses
import json
import os
import statistics
from dataclasses import dataclass
from math import comb
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tabulate import tabulate

from . import api
from .capture import is_exported_program
from .data import Data, DataError, load_data
from .errors import MissingExtraError
from .graph.batches import InBatches, batched, fit_batch, static_batch
from .timing import batch_size as batch_of
from .timing import call, compare, progress, throughput

BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
STRATEGIES = ("auto", "constant")
DEFAULT = "auto"  # optimize's default strategy: its rows are compared with constant r


@dataclass(frozen=True)
class Row:
    strategy: str
    budget: float
    ratio: float  # FLOPs of the plan over the original's, at the calibration inputs
    r: tuple[int, ...] | None
    cosine: float  # mean per-input cosine similarity of outputs (pooled embeddings)
    top1: float | None = None  # % with labels
    agreement: float | None = None  # % of inputs whose top-1 class is unchanged
    nn_agreement: float | None = None  # % whose nearest other input is unchanged (embeddings)
    items_per_s: float | None = None
    speedup: float | None = None
    right: str | None = None  # which inputs it gets right (packed bits, hex), for the pairing


@dataclass(frozen=True)
class Pair:
    budget: float
    only_default: int  # inputs only the default strategy gets right
    only_constant: int
    difference: float  # points
    p: float  # two-sided exact McNemar p-value


@dataclass(frozen=True)
class SweepResult:
    model: str
    data: str
    evaluated: int
    calibration: str
    rows: tuple[Row, ...]
    pairs: tuple[Pair, ...]
    throughput_batch: int | None

    @classmethod
    def from_dict(cls, d: dict) -> "SweepResult":
        """The result ``to_dict`` (or ``--json``) wrote."""
        rows = tuple(Row(**{**r, "r": None if r["r"] is None else tuple(r["r"])})
                     for r in d["rows"])
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in fields}, "rows": rows,
                      "pairs": tuple(Pair(**p) for p in d["pairs"])})

    def ordered(self) -> list[Row]:
        """Rows by strategy (first seen first), budgets from high to low: the original first."""
        names = list(dict.fromkeys(r.strategy for r in self.rows))
        return sorted(self.rows, key=lambda r: (r.budget < 1.0 or r.strategy != "original",
                                                names.index(r.strategy), -r.budget))

    def table(self, fmt: str = "github") -> str:
        has = lambda key: any(getattr(r, key) is not None for r in self.rows)  # noqa: E731
        cols = [("strategy", "strategy", "{}"), ("budget", "budget", "{:g}"),
                ("ratio", "FLOP ratio", "{:.3f}"), ("r", "schedule r", None)]
        cols += [(k, h, f) for k, h, f in (
            ("top1", "top-1 %", "{:.2f}"), ("agreement", "same prediction %", "{:.2f}"),
            ("cosine", "output cosine", "{:.4f}"), ("nn_agreement", "same nearest neighbour %",
                                                    "{:.2f}"),
            ("items_per_s", "items/s", "{:.1f}"), ("speedup", "speed-up", "{:.2f}x")) if has(k)]
        body = []
        for row in self.ordered():
            cells = []
            for key, _, fmt_ in cols:
                v = getattr(row, key)
                if key == "r":
                    cells.append("—" if v is None else " ".join(map(str, v)))
                else:
                    cells.append("—" if v is None else fmt_.format(v))
            body.append(cells)
        return tabulate(body, headers=[h for _, h, _ in cols], tablefmt=fmt, disable_numparse=True)

    def paired_table(self, fmt: str = "github") -> str:
        body = [[f"{p.budget:g}", p.only_default, p.only_constant, f"{p.difference:+.2f}",
                 f"{p.p:.2f}"] for p in self.pairs]
        head = ["budget", f"only {DEFAULT} right", "only constant right", "difference (points)",
                "McNemar p"]
        return tabulate(body, headers=head, tablefmt=fmt, disable_numparse=True)

    def __str__(self) -> str:
        text = (f"tome-fx sweep: {self.model} on {self.evaluated} inputs of {self.data} "
                f"(calibration: {self.calibration})\n\n{self.table('simple')}")
        if self.pairs:
            text += f"\n\n{DEFAULT} vs constant, input by input:\n\n{self.paired_table('simple')}"
        return text

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def plot(self, path) -> None:
        """PNG: accuracy (top-1, else agreement, else cosine) against the FLOP ratio and, when
        measured, against throughput; one line per strategy."""
        try:
            import matplotlib
        except ImportError:
            raise MissingExtraError("plotting needs matplotlib: pip install matplotlib") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key, label = next((k, lab) for k, lab in (
            ("top1", "top-1 accuracy (%)"), ("agreement", "same prediction as original (%)"),
            ("nn_agreement", "same nearest neighbour (%)"), ("cosine", "output cosine"))
            if any(getattr(r, k) is not None for r in self.rows))
        speed = any(r.items_per_s is not None for r in self.rows)
        fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(11 if speed else 6, 4.2),
                                 squeeze=False)
        original = next((r for r in self.rows if r.budget >= 1.0), None)
        for name in dict.fromkeys(r.strategy for r in self.rows if r.budget < 1.0):
            pts = [r for r in self.rows if r.strategy == name or r is original]
            for ax, x in zip(axes[0], ("ratio", "items_per_s")):
                xy = sorted((getattr(r, x), getattr(r, key)) for r in pts)
                ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", ms=3, label=name)
        axes[0][0].set_xlabel("FLOP ratio (rewritten / original)")
        axes[0][0].invert_xaxis()
        if speed:
            axes[0][1].set_xlabel("throughput (items/s)")
        for ax in axes[0]:
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{self.model}: {self.evaluated} inputs of {self.data}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


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
        m = torch.ones(y.shape[:2]) if mask is None else mask.to(y.dtype)
        return (y * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
    return y.reshape(len(y), -1)


@torch.no_grad()
def outputs(module, data: Data, batch_size: int, bar=None) -> tuple[torch.Tensor, bool]:
    """(``pooled`` outputs of ``module`` over ``data``, in order, [N, D]; whether they are
    ``.logits`` of one score vector per input: a HuggingFace classifier, text ones included)."""
    out, logits = [], False
    for inputs, _ in data.batches(batch_size):
        y = call(module, inputs)
        logits = isinstance(getattr(y, "logits", None), torch.Tensor) and y.logits.dim() == 2
        out.append(pooled(y, inputs))
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
            out["right"] = _bits(p == data.labels)
    elif len(ref) > 1:
        near = _nearest(ref) if ref_nearest is None else ref_nearest
        out["nn_agreement"] = 100 * float((_nearest(emb) == near).double().mean())
    return out


def _bits(mask: torch.Tensor) -> str:
    return np.packbits(mask.numpy()).tobytes().hex()


def _unbits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), np.uint8))[:n].astype(bool)


def mcnemar(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: how likely a split this uneven of the discordant
    inputs is if both methods were equally accurate (binomial, p = 1/2)."""
    m, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0


def _pairs(rows: list[Row], n: int) -> tuple[Pair, ...]:
    right = {(r.strategy, r.budget): _unbits(r.right, n) for r in rows if r.right}
    out = []
    for budget in sorted({b for _, b in right if b < 1.0}, reverse=True):
        if (DEFAULT, budget) in right and ("constant", budget) in right:
            a, b = right[(DEFAULT, budget)], right[("constant", budget)]
            only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
            out.append(Pair(budget, only_a, only_b, 100 * (only_a - only_b) / n,
                            mcnemar(only_a, only_b)))
    return tuple(out)


def _variants(strategies) -> dict[str, dict]:
    """name -> optimize keyword arguments: a strategy name, or a dict of such entries."""
    if isinstance(strategies, dict):
        return {str(k): dict(v) for k, v in strategies.items()}
    if isinstance(strategies, str):
        strategies = [s for s in strategies.split(",") if s.strip()]
    return {s: {"strategy": s} for s in strategies}


def _calibration(data: Data, calibration, model) -> tuple[Data, Data | None, str]:
    """(evaluation data, calibration data or None, how calibration was done)."""
    if isinstance(calibration, (Data, str, os.PathLike)):
        calib = calibration if isinstance(calibration, Data) else load_data(calibration, model)
        return data, calib, f"{len(calib)} inputs of {calib.source}"
    if not calibration:
        return data, None, "none (the data-free rule)"
    calib, rest = data.split(int(calibration))
    return rest, calib, f"{len(calib)} inputs of {data.source} (seeded, not evaluated)"


def sweep(model, data, budgets=BUDGETS, strategies=STRATEGIES, *, calibration: Any = 64,
          batch_size: int = 64, measure: bool = True, warmup: int = 2, runs: int = 5,
          quiet: bool | None = None, name: str | None = None, original=None, bar_stream=None,
          **optimize_kwargs) -> SweepResult:
    """Every strategy at every budget on ``data`` (a ``Data`` or a path for ``load_data``).

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
    Other keyword arguments go to ``optimize``."""
    if original is None:
        original = model.module() if is_exported_program(model) else model
    if isinstance(data, (str, os.PathLike)):
        data = load_data(data, original)
    fixed = static_batch(model)
    run_original = batched(original) if fixed is None else InBatches(original, fixed)
    budgets = sorted({float(api.check_budget(b)) for b in budgets} | {1.0}, reverse=True)
    variants = _variants(strategies)
    data, calib, how = _calibration(data, calibration, original)
    plan_inputs = calib.inputs() if calib is not None else data.inputs(0, min(len(data), 2))
    plan_kw = {"calibration": plan_inputs} if calib is not None else {"example_inputs": plan_inputs}
    if fixed is not None:  # captured at its one batch; calibration runs in chunks of it
        plan_kw["example_inputs"] = fit_batch(plan_inputs, fixed)
    first = data.inputs(0, batch_size)
    steps = -(-len(data) // batch_size)
    bar = progress(steps * (1 + len(variants) * (len(budgets) - 1)), "sweep", quiet, bar_stream)
    ref, logits = outputs(run_original, data, batch_size, bar)
    check_labels(data, ref, logits)
    near = None if is_classifier(ref, data, logits) or len(ref) < 2 else _nearest(ref)
    rows, seen, base_speeds = [], {}, []

    def row(label, budget, ratio, r, emb, speed=None, speedup=None):
        kw = {k: v for k, v in scores(ref, emb, data, near, logits).items() if k in _ROW_SCORES}
        return Row(label, budget, ratio, r, items_per_s=speed, speedup=speedup, **kw)

    for budget in budgets[1:]:
        for label, kw in variants.items():
            bar.set_description(f"{label} at {budget:g}")
            fast = api.optimize(model, flops_budget=budget, **plan_kw, **optimize_kwargs, **kw)
            plan = fast.tome
            fast = batched(fast)
            key = (tuple(plan.r), repr(sorted((k, v) for k, v in kw.items() if k != "strategy")))
            if key not in seen:  # same schedule, same rewrite: same outputs
                seen[key] = outputs(fast, data, batch_size, bar)[0]
            else:
                bar.update(steps)
            speed = compare(run_original, fast, first, warmup, runs) if measure else {}
            base_speeds += [speed["original"]] if speed else []
            rows.append(row(label, budget, plan.ratio, tuple(plan.r), seen[key],
                            speed.get("rewritten"), speed.get("speedup")))
    base = None
    if measure:
        base = (statistics.median(base_speeds) if base_speeds
                else throughput(run_original, first, warmup, runs))
    rows.insert(0, row("original", 1.0, 1.0, None, ref, base, None if base is None else 1.0))
    bar.close()
    return SweepResult(name or type(original).__name__, data.source, len(data), how, tuple(rows),
                       _pairs(rows, len(data)), batch_of(first) if measure else None)
