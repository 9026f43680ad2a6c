"""A paired check of ToDo compiled: tome_fx's graph under inductor (default and
``dynamic=False``) beside the authors' processor compiled, 5 interleaved rounds, 64x64 latent
(``bench_todo``'s model and inputs). Prints median CPU seconds and first-call seconds.

    taskset -c 1 python benchmarks/todo_compile_pair.py
"""
import sys, time, copy, statistics, torch, warnings
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "tests"); sys.path.insert(0, ".")
warnings.simplefilter("ignore")
import tome_fx
from bench_todo import build
from bench_tomesd import positional, interleaved
from reference_todo import ReferenceToDo
torch.set_num_threads(1)
model, inputs = build("unet", 64, 2)
rest = {k: v for k, v in inputs.items() if k != "sample"}
fast = tome_fx.optimize(model, method="todo", example_inputs=inputs)
g = fast.graph

authors = ReferenceToDo(copy.deepcopy(model), widths=(64, 128)).apply()
v = {"ours dyn-default": torch.compile(g, fullgraph=True),
     "ours static": torch.compile(g, fullgraph=True, dynamic=False),
     "authors": positional(torch.compile(authors))}
def run(fn):
    with torch.no_grad():
        return fn(inputs["sample"], **rest)
first, out, cpu, wall = interleaved(v, run, 5)
for k in v: print(k, round(statistics.median(cpu[k]), 3), round(first[k], 1))
