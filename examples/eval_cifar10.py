"""Accuracy and throughput of the trained CIFAR-10 ViT (../shared) under tome_fx, per method and FLOP budget.

    python examples/eval_cifar10.py                 # full test set; writes benchmarks/results/cifar10_eval.*
    python examples/eval_cifar10.py --limit 500 --budgets 0.8 0.5 --no-throughput --out /tmp/x

For every method (a schedule strategy, with or without proportional attention) and budget it
builds ``tome_fx.optimize(model, flops_budget=b, ...)`` and records the schedule, the FLOP ratio
from the cost model, top-1 accuracy on the test set and images/s on a fixed batch. Methods are
entries of ``METHODS``: adding one (e.g. ToMato) is one line.

Calibration inputs for ``optimize`` (the token count, and the "auto" strategy's fidelity proxy) are
a fixed random subset of the *training* set; test labels are only used to score.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tome_fx first
import cifar_vit as cv  # noqa: E402

import tome_fx  # noqa: E402

BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
RESULTS = cv.ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Method:
    """One line of the table/plot: ``build(model, budget, calib) -> module`` (a tome_fx module)."""

    name: str
    build: Callable
    prop_attn: bool = True


def _strategy(strategy: str, prop_attn: bool) -> Callable:
    def build(model, budget, calib):
        return tome_fx.optimize(model, flops_budget=budget, example_inputs=calib,
                                prop_attn=prop_attn, strategy=strategy)
    return build


def _tomato(similarity: str) -> Callable:
    def build(model, budget, calib):  # budget mode: every image ends with the same token count
        return tome_fx.optimize(model, method="tomato", flops_budget=budget, example_inputs=calib,
                                similarity=similarity)
    return build


METHODS = [
    Method("auto (default)", _strategy("auto", True)),
    Method("constant", _strategy("constant", True)),
    Method("decreasing", _strategy("decreasing", True)),
    Method("auto, no prop-attn", _strategy("auto", False), prop_attn=False),
    Method("constant, no prop-attn", _strategy("constant", False), prop_attn=False),
    Method("decreasing, no prop-attn", _strategy("decreasing", False), prop_attn=False),
    Method("ToMato (keys)", _tomato("keys")),
    Method("ToMato (attention)", _tomato("attention")),
]


@torch.no_grad()
def throughput(model, batch: torch.Tensor, reps: int) -> float:
    """Images/s on ``batch``: warm-up, then the median of ``reps`` timed forward passes."""
    model(batch)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - t)
    times.sort()
    return len(batch) / times[len(times) // 2]


def _predict(model, x, batch, label) -> torch.Tensor:
    bar = cv.Progress((len(x) + batch - 1) // batch, label)
    pred = cv.predict(model, x, batch, bar)
    bar.close()
    return pred


def _pct(a, b) -> float:
    return float((a == b).float().mean()) * 100


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = cv.load_model()
    x, y = cv.load_test(args.limit)
    calib_u8, _ = cv.load_train_uint8(cv.calibration_indices(args.calib))
    calib = (cv.normalize(calib_u8),)
    tp_batch = x[: args.tp_batch]
    methods = [m for m in METHODS if not args.methods or m.name in args.methods]
    rows = []
    orig = _predict(model, x, args.batch, "original")
    row = dict(method="original", budget=1.0, ratio=1.0, r=None, accuracy=_pct(orig, y),
               agreement=100.0)
    if not args.no_throughput:
        row["images_per_s"] = throughput(model, tp_batch, args.reps)
        traced = tome_fx.optimize(model, r=0, example_inputs=calib)
        row["images_per_s_traced_r0"] = throughput(traced, tp_batch, args.reps)
    rows.append(row)
    cache: dict = {}  # same rewrite (schedule, prop-attn, method kind) -> same accuracy
    for budget in args.budgets:  # budget-major: partial runs cover every method
        for method in methods:
            t0 = time.perf_counter()
            module = method.build(model, budget, calib)
            plan = module.tome
            key = (tuple(plan.r), method.prop_attn, plan.method, plan.similarity)
            label = f"{method.name} b={budget}"
            if key not in cache:
                cache[key] = _predict(module, x, args.batch, label)
            row = dict(method=method.name, budget=budget, ratio=plan.ratio, r=list(plan.r),
                       accuracy=_pct(cache[key], y), agreement=_pct(cache[key], orig),
                       strategy=plan.strategy, drift=plan.drift,
                       build_s=time.perf_counter() - t0,
                       right=_bits(cache[key] == y))
            if not args.no_throughput:
                row["images_per_s"] = throughput(module, tp_batch, args.reps)
            rows.append(row)
            if args.partial:  # rows so far, for long runs on busy machines
                args.partial.write_text(json.dumps(rows, indent=1))
    return dict(
        model="vit_cifar10.pth (../shared/models)", test_images=len(x),
        calibration="%d training images (seeded random subset)" % args.calib,
        torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor()
        or platform.machine(), throughput_batch=len(tp_batch), throughput_reps=args.reps,
        command=" ".join(["python", "examples/eval_cifar10.py", *sys.argv[1:]]), rows=rows,
    )


def _bits(mask: torch.Tensor) -> str:
    """A bool per test image, packed as hex (which images a method gets right)."""
    return np.packbits(mask.numpy()).tobytes().hex()


def _unbits(text: str, n: int) -> set:
    return set(np.flatnonzero(np.unpackbits(np.frombuffer(bytes.fromhex(text), np.uint8))[:n]))


def paired(result: dict, a: str = "auto (default)", b: str = "constant") -> str:
    """Method ``a`` vs ``b`` on the same test images, per budget: how many images only one of
    them gets right, and the two-sided exact McNemar p-value (whether the accuracy difference
    could be the luck of which changed predictions land on a correct label)."""
    from math import comb

    n = result["test_images"]
    right = {(r["method"], r["budget"]): _unbits(r["right"], n) for r in result["rows"]
             if "right" in r}
    lines = [f"| budget | only {a} right | only {b} right | difference (points) | McNemar p |",
             "|---|---|---|---|---|"]
    for budget in sorted({k[1] for k in right}, reverse=True):
        if (a, budget) not in right or (b, budget) not in right:
            continue
        ra, rb = right[(a, budget)], right[(b, budget)]
        only_a, only_b = len(ra - rb), len(rb - ra)
        k, m = min(only_a, only_b), only_a + only_b
        p = min(1.0, 2 * sum(comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
        lines.append(f"| {budget:g} | {only_a} | {only_b} | {100 * (only_a - only_b) / n:+.2f} | "
                     f"{p:.2f} |")
    return "\n".join(lines)


def table(result: dict) -> str:
    tp = any("images_per_s" in r for r in result["rows"])
    head = ("| method | budget | FLOP ratio | schedule r | top-1 % | Δ vs original "
            "| same prediction as original % |")
    sep = "|---|---|---|---|---|---|---|"
    if tp:
        head += " images/s | speed-up |"
        sep += "---|---|"
    base = result["rows"][0]
    lines = [head, sep]
    names = list(dict.fromkeys(r["method"] for r in result["rows"]))
    rows = sorted(result["rows"], key=lambda r: (names.index(r["method"]), -r["budget"]))
    for r in rows:
        sched = "—" if r["r"] is None else " ".join(str(v) for v in r["r"])
        line = (f"| {r['method']} | {r['budget']:g} | {r['ratio']:.3f} | {sched} | "
                f"{r['accuracy']:.2f} | {r['accuracy'] - base['accuracy']:+.2f} | "
                f"{r['agreement']:.2f} |")
        if tp:
            line += f" {r['images_per_s']:.0f} | {r['images_per_s'] / base['images_per_s']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["rows"][0]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    names = []
    for r in result["rows"][1:]:
        if r["method"] not in names:
            names.append(r["method"])
    for name in names:
        pts = sorted((r["ratio"], r["accuracy"]) for r in result["rows"] if r["method"] == name)
        pts.append((1.0, base["accuracy"]))
        style = "--" if "no prop-attn" in name else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=name)
    ax.axhline(base["accuracy"], color="grey", lw=0.8, ls=":", label="original")
    ax.set_xlabel("FLOP ratio (rewritten / original)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"CIFAR-10 ViT, {result['test_images']} test images")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_section(path: Path, name: str, body: str):
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="first N test images (default all)")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--methods", nargs="*", default=None, help="method names (default all)")
    p.add_argument("--calib", type=int, default=256, help="calibration training images")
    p.add_argument("--batch", type=int, default=500, help="evaluation batch size")
    p.add_argument("--tp-batch", type=int, default=256, help="throughput batch size")
    p.add_argument("--reps", type=int, default=10, help="timed passes per throughput number")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default torch's)")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--partial", type=Path, default=None, help="write rows here as they finish")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--eval-md", type=Path, default=None,
                   help="also write the table into this markdown file's cifar10_eval section")
    p.add_argument("--render", type=Path, default=None,
                   help="no run: re-write the table, plot and --eval-md section from this JSON")
    args = p.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
    elif not cv.available():
        sys.exit(f"eval_cifar10: {cv.missing_reason()}")
    else:
        result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        (args.out / "cifar10_eval.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    if any("right" in r for r in result["rows"]):
        md += "\n\nPaired, default vs constant (same test images):\n\n" + paired(result)
    (args.out / "cifar10_eval.md").write_text(md + "\n")
    plot(result, args.out / "cifar10_eval.png")
    if args.eval_md:
        tp = any("images_per_s" in r for r in result["rows"])
        note = (f"Command: `{result['command']}` ({result['test_images']} test images, "
                f"calibration: {result['calibration']}, torch {result['torch']}, "
                f"{result['threads']} threads"
                + (f", throughput on a batch of {result['throughput_batch']}, median of "
                   f"{result['throughput_reps']} passes)." if tp else ", no throughput).")
                + " Plot: `benchmarks/results/cifar10_eval.png`.")
        update_section(args.eval_md, "cifar10_eval", note + "\n\n" + md)
    print(md)
    return result


if __name__ == "__main__":
    main()
