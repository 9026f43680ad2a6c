"""Every schedule the ``auto`` strategy chooses among, scored on held-out *training* images.

    python examples/heldout_schedules.py            # writes benchmarks/results/heldout_schedules.*
    python examples/heldout_schedules.py --heldout 2000 --budgets 0.8 --out /tmp/x

For each FLOP budget it lists auto's candidates (``tome_fx.cost.candidates``) with their
calibration drift (what ``auto`` minimises, on the same 256 calibration images as
``eval_cifar10.py``) and, on a disjoint seeded sample of training images, top-1 accuracy and the
share of predictions unchanged from the original. It marks the schedule auto picks and the
constant one, and groups the candidates by drift relative to the constant schedule's with their
accuracy and agreement against it. This is how to judge a change to the selection rule without
the test set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tome_fx first
import cifar_vit as cv  # noqa: E402
from eval_cifar10 import BUDGETS, RESULTS  # noqa: E402

from tome_fx import cost  # noqa: E402
from tome_fx.api import rewrite  # noqa: E402
from tome_fx.capture import capture  # noqa: E402


def heldout_indices(n: int, calib: np.ndarray, seed: int = 1) -> np.ndarray:
    """``n`` training indices disjoint from the calibration subset."""
    rest = np.setdiff1d(np.arange(50000), calib)
    return np.random.default_rng(seed).choice(rest, size=n, replace=False)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = cv.load_model()
    calib_idx = cv.calibration_indices(args.calib)
    calib = cv.normalize(cv.load_train_uint8(calib_idx)[0])
    x_u8, y = cv.load_train_uint8(heldout_indices(args.heldout, calib_idx), progress=True)
    x = cv.normalize(x_u8)
    original = cv.predict(model, x)
    cm = cost.CostModel.build(capture(model, (calib,)), True)
    rows = []
    for budget in args.budgets:
        cands = cost.scored_candidates(cm, budget, "auto")  # what search("auto") picks from
        picked, _ = cost.best(cm, cands)
        constant, constant_drift = cost.search(cm, budget, "constant")
        if constant not in [sched for sched, _ in cands.values()]:
            cands["constant (strategy)"] = (constant, constant_drift)
        bar = tqdm(total=len(cands), leave=False, desc=f"b={budget}: {len(cands)} schedules")
        for name, (sched, drift) in cands.items():
            gm = rewrite(model, lambda n, s=sched: list(s) + [0] * (n - len(s)), (calib,)).graph_module
            pred = cv.predict(gm, x)
            rows.append(dict(budget=budget, name=name, r=list(sched),
                             ratio=cm.flops(sched) / cm.flops_original, drift=drift,
                             drift_vs_constant=drift / constant_drift if constant_drift > 0 else None,
                             accuracy=100 * float((pred == y).float().mean()),
                             agreement=100 * float((pred == original).float().mean()),
                             auto=sched == picked, constant=sched == constant))
            bar.update()
        bar.close()
    return dict(heldout=len(y), calibration=args.calib, threads=torch.get_num_threads(),
                original_accuracy=100 * float((original == y).float().mean()),
                command=" ".join(["python", "examples/heldout_schedules.py", *sys.argv[1:]]),
                rows=rows)


def table(result: dict) -> str:
    lines = [f"Held-out: {result['heldout']} training images outside the {result['calibration']} "
             f"calibration images; original top-1 {result['original_accuracy']:.2f}%. "
             f"Command: `{result['command']}`.", "",
             "| budget | candidate | schedule r | FLOP ratio | calibration drift "
             "| drift / constant's | top-1 % | same prediction % | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mark = " ".join(m for m, on in (("auto", r["auto"]), ("constant", r["constant"])) if on)
        rel = "" if r["drift_vs_constant"] is None else f"{r['drift_vs_constant']:.2f}"
        lines.append(f"| {r['budget']:g} | {r['name']} | {' '.join(map(str, r['r']))} | "
                     f"{r['ratio']:.3f} | {r['drift']:.2e} | {rel} | {r['accuracy']:.2f} | "
                     f"{r['agreement']:.2f} | {mark} |")
    return "\n".join(lines + ["", bands(result["rows"])])


def bands(rows: list[dict]) -> str:
    """Candidates grouped by calibration drift relative to the constant schedule's, with their
    held-out top-1 and same-prediction share against constant's at the same budget: how far
    drift differences carry over to held-out accuracy and fidelity."""
    const = {r["budget"]: r for r in rows if r["constant"]}
    edges = [(0.0, 0.5, "<= 0.5"), (0.5, 1.0, "0.5 to 1"), (1.0, float("inf"), "> 1")]
    lines = ["| drift / constant's | candidates | mean top-1 minus constant's | more accurate "
             "| mean same prediction minus constant's | more faithful |", "|---|---|---|---|---|---|"]
    for lo, hi, label in edges:
        picked = [r for r in rows if not r["constant"] and r["drift_vs_constant"] is not None
                  and lo < r["drift_vs_constant"] <= hi]
        if picked:
            acc = [r["accuracy"] - const[r["budget"]]["accuracy"] for r in picked]
            agr = [r["agreement"] - const[r["budget"]]["agreement"] for r in picked]
            lines.append(f"| {label} | {len(picked)} | {sum(acc) / len(acc):+.2f} | "
                         f"{sum(x > 0 for x in acc)} of {len(acc)} | {sum(agr) / len(agr):+.2f} | "
                         f"{sum(x > 0 for x in agr)} of {len(agr)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--heldout", type=int, default=20000, help="held-out training images")
    p.add_argument("--calib", type=int, default=256, help="calibration training images")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default torch's)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if not cv.available():
        sys.exit(f"heldout_schedules: {cv.missing_reason()}")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout_schedules.json").write_text(json.dumps(result, indent=1))
    md = table(result)
    (args.out / "heldout_schedules.md").write_text(md + "\n")
    print(md)
    return result


if __name__ == "__main__":
    main()
