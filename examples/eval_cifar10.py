"""Accuracy and throughput of the trained CIFAR-10 ViT (../shared) under tome_fx: ``tome_fx.sweep``
with every method.

    python examples/eval_cifar10.py                 # full test set; writes benchmarks/results/cifar10_eval.*
    python examples/eval_cifar10.py --limit 500 --budgets 0.8 0.5 --no-throughput --out /tmp/x

The same numbers from the command line, on the model saved as a ``.pt2`` and the images as
folders (``python examples/cifar_vit.py DIR`` writes them)::

    tome-fx sweep DIR/vit_cifar10.pt2 --data DIR/test --calib-data DIR/calib --calib 256 \\
        --mean 0.4914,0.4822,0.4465 --std 0.2023,0.1994,0.2010 --batch-size 256

Methods are entries of ``METHODS``: a label and the ``optimize`` arguments. Calibration inputs
(the token count, and the "auto" strategy's fidelity proxy) are a fixed random subset of the
*training* set; test labels are only used to score.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tome_fx first
import cifar_vit as cv  # noqa: E402

import tome_fx  # noqa: E402

BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
RESULTS = cv.ROOT / "benchmarks" / "results"

METHODS = {  # label -> optimize(...) arguments; "auto" is the default, compared with "constant"
    "auto": {"strategy": "auto"},
    "constant": {"strategy": "constant"},
    "decreasing": {"strategy": "decreasing"},
    "auto, no prop-attn": {"strategy": "auto", "prop_attn": False},
    "constant, no prop-attn": {"strategy": "constant", "prop_attn": False},
    "decreasing, no prop-attn": {"strategy": "decreasing", "prop_attn": False},
    "ToMato (keys)": {"method": "tomato", "similarity": "keys"},
    "ToMato (attention)": {"method": "tomato", "similarity": "attention"},
}


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


def run(args) -> tome_fx.SweepResult:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = cv.load_test(args.limit)
    calib_u8, _ = cv.load_train_uint8(cv.calibration_indices(args.calib))
    methods = {k: v for k, v in METHODS.items() if not args.methods or k in args.methods}
    return tome_fx.sweep(
        cv.load_model(), tome_fx.Data.from_tensors(x, y, "cifar10_test.npz"), args.budgets,
        methods, calibration=tome_fx.Data.from_tensors(cv.normalize(calib_u8), source=(
            f"{args.calib} training images (seeded random subset)")),
        batch_size=args.batch, measure=not args.no_throughput, warmup=1, runs=args.reps,
        name="vit_cifar10.pth")


def main(argv=None) -> tome_fx.SweepResult:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="first N test images (default all)")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--methods", nargs="*", default=None, help="labels of METHODS (default all)")
    p.add_argument("--calib", type=int, default=256, help="calibration training images")
    p.add_argument("--batch", type=int, default=256,
                   help="evaluation batch; throughput is timed on the first one")
    p.add_argument("--reps", type=int, default=10, help="timed passes per throughput number")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default torch's)")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--eval-md", type=Path, default=None,
                   help="also write the table into this markdown file's cifar10_eval section")
    p.add_argument("--render", type=Path, default=None,
                   help="no run: re-write the table, plot and --eval-md section from this JSON")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        result = tome_fx.SweepResult.from_dict(saved)
        info = {k: saved[k] for k in ("command", "torch", "threads", "machine")}
    elif not cv.available():
        sys.exit(f"eval_cifar10: {cv.missing_reason()}")
    else:
        result = run(args)
        command = " ".join(["python", "examples/eval_cifar10.py",
                            *(sys.argv[1:] if argv is None else argv)])
        info = {"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine()}
    command = info["command"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cifar10_eval.json").write_text(json.dumps({**info, **result.to_dict()}, indent=1))
    md = result.table() + "\n\nPaired, auto (the default) vs constant, image by image:\n\n" + \
        result.paired_table()
    (args.out / "cifar10_eval.md").write_text(md + "\n")
    result.plot(args.out / "cifar10_eval.png")
    if args.eval_md:
        tp = "" if result.throughput_batch is None else (
            f", throughput on the first batch of {result.throughput_batch}, median of "
            f"{args.reps} passes")
        note = (f"Command: `{command}` ({result.evaluated} test images, calibration: "
                f"{result.calibration}, torch {info['torch']}, {info['threads']} threads{tp}). "
                "Plot: `benchmarks/results/cifar10_eval.png`.")
        update_section(args.eval_md, "cifar10_eval", note + "\n\n" + md)
    print(md)
    return result


if __name__ == "__main__":
    main()
