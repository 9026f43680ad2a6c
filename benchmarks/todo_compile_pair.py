"""A paired check of ToDo compiled: tome_fx's graph under inductor (default and
``dynamic=False``) beside the authors' processor compiled (``tests/reference_todo.py``),
interleaved rounds on ``bench_todo``'s SD1.5-shaped UNet, batch 2, timestep 999. Prints and
writes the median CPU seconds per call and the first-call seconds.

    taskset -c 1 python benchmarks/todo_compile_pair.py --latent 64 --runs 9
"""
import argparse
import copy
import json
import os
import statistics
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))
import tome_fx  # noqa: E402
from bench_todo import build  # noqa: E402
from bench_tomesd import interleaved, positional  # noqa: E402
from reference_todo import ReferenceToDo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="cpu1")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    model, inputs = build("unet", args.latent, 2)
    rest = {k: v for k, v in inputs.items() if k != "sample"}
    graph = tome_fx.optimize(model, method="todo", example_inputs=inputs).graph
    authors = ReferenceToDo(copy.deepcopy(model), widths=(64, 128)).apply()
    variants = {"tome_fx todo compiled": torch.compile(graph, fullgraph=True),
                "tome_fx todo compiled, dynamic=False": torch.compile(graph, fullgraph=True,
                                                                      dynamic=False),
                "authors' ToDo compiled": positional(torch.compile(authors))}

    def run(fn):
        with torch.no_grad():
            return fn(inputs["sample"], **rest)

    first, _, cpu, _ = interleaved(variants, run, args.runs)
    rows = {k: {"cpu_s": statistics.median(cpu[k]), "all_cpu_s": cpu[k], "first_call_s": first[k]}
            for k in variants}
    info = {"command": " ".join(["python"] + sys.argv), "latent": args.latent,
            "runs": args.runs, "load_start": load0, "load_end": os.getloadavg()[0],
            "torch": torch.__version__, "rows": rows}
    out = Path(args.out) / f"todo_compile_pair_unet{args.latent}_{args.tag}.json"
    out.write_text(json.dumps(info, indent=2))
    for k, r in rows.items():
        print(f"{k}: {r['cpu_s']:.3f} s (first call {r['first_call_s']:.1f} s)")


if __name__ == "__main__":
    main()
