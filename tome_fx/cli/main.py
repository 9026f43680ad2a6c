"""``tome-fx`` command line: ``report``, ``bench``, ``visualize`` and ``export``.

Every failure is one line on stderr, ``tome-fx: error: ...``, exit code 2; ``--debug`` shows
the traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import warnings

_STDERR = None  # the real stderr while main() holds back library output (progress bars go here)

SOURCE_HELP = ("model: timm:NAME (random weights unless --checkpoint), a .pt/.pth file saved with "
               "torch.save(model) (needs --trust-pickle), a .pt2 archive from torch.export.save, "
               "or a local HuggingFace model directory")

REPORT_EPILOG = """examples:
  tome-fx report timm:vit_small_patch16_224 --flops-budget 0.5
  tome-fx report model.pt --trust-pickle --r 8 --format markdown
  tome-fx report timm:deit_small_patch16_224 --checkpoint deit_s.pth --flops-budget 0.6 --bench
  tome-fx report exported.pt2 --format json > report.json"""

BENCH_EPILOG = """examples:
  tome-fx bench timm:vit_base_patch16_224 --flops-budget 0.5 --batch-size 64 --dtype float16 --compile
  tome-fx bench model.pt --trust-pickle --r 8 --device cpu --runs 5 --json bench.json"""

VISUALIZE_EPILOG = """examples:
  tome-fx visualize timm:vit_small_patch16_224 photo.jpg -o groups.png --r 16
  tome-fx visualize model.pt --trust-pickle photo.jpg -o groups.png --flops-budget 0.5 --layer 5"""


EXPORT_EPILOG = """examples:
  tome-fx export timm:vit_small_patch16_224 --flops-budget 0.5 -o vit_s_half.onnx
  tome-fx export model.pt --trust-pickle --r 8 -o fast.pt2

The format follows the suffix (.onnx needs: pip install -e ".[export]"). The file is loaded and
run on the example inputs and on one more batch size; the largest difference to the rewritten
module is printed, and above 1e-4 (fp32) it is an error."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one ``tome-fx: error:`` line."""

    def error(self, message):
        sys.stderr.write(f"tome-fx: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# shared steps
# ---------------------------------------------------------------------------------------------

def _parse_r(text: str | None):
    if text is None:
        return 8
    parts = [p for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"--r must be an int or a comma-separated list of ints, got {text!r}")
    return values[0] if len(values) == 1 else values


def _check(args):
    """Validate options before loading anything (fast one-line errors)."""
    from ..cost import check_budget
    from .sources import parse_input_size

    if args.flops_budget is not None:
        check_budget(args.flops_budget)
        args.r_value = None
    else:
        args.r_value = _parse_r(args.r)
    args.size = parse_input_size(args.input_size)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "runs", 1) < 1 or getattr(args, "warmup", 0) < 0:
        raise ValueError(f"need --runs >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}")


def _source(args):
    from .sources import load

    return load(args.source, trust_pickle=args.trust_pickle, checkpoint=args.checkpoint,
                input_size=args.size)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _measure(original, rewritten, inputs, args, label=""):
    """Throughput of both modules: {"original": items/s, "rewritten": ..., "speedup": ...}."""
    from .bench import Progress, throughput

    res = {}
    for name, fn in (("original", original), ("rewritten", rewritten)):
        bar = Progress(args.warmup + args.runs, f"{label}{name}", stream=_STDERR)
        try:
            res[name] = throughput(fn, inputs, args.warmup, args.runs, bar)
        finally:
            bar.close()
    res["speedup"] = res["rewritten"] / res["original"]
    return res


# ---------------------------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------------------------

def report(args) -> int:
    from . import report as rep
    from .sources import example_inputs

    _check(args)
    src = _source(args)
    inputs = example_inputs(src, args.size, args.batch_size)
    data, fast = rep.build(src.target, src.model, inputs, r=args.r_value,
                           flops_budget=args.flops_budget, strategy=args.strategy)
    data["source"] = args.source
    if args.bench:
        device = _device(args.device)
        moved = tuple(t.to(device) for t in inputs)
        speeds = _measure(src.model.to(device), fast.to(device), moved, args)
        data["bench"] = {"device": str(device), "dtype": "float32", "batch": len(moved[0]),
                         "warmup": args.warmup, "runs": args.runs, **speeds}
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print(rep.format_text(data, args.format))
    return 0


def bench(args) -> int:
    import torch
    from tabulate import tabulate

    from .. import api

    from .sources import example_inputs

    _check(args)
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    src = _source(args)
    recorded = src.example_inputs  # an ExportedProgram's: its batch may be fixed
    batch = args.batch_size or (len(recorded[0]) if recorded else 32 if device.type == "cuda" else 8)
    plan_inputs = example_inputs(src, args.size, batch if recorded else min(batch, 2))
    fast = api.optimize(src.target, r=args.r_value, flops_budget=args.flops_budget,
                            example_inputs=plan_inputs)
    plan = fast.tome
    size = tuple(plan_inputs[0].shape[1:])
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(batch, *size, generator=g).to(device=device, dtype=dtype),)
    original = src.model.to(device=device, dtype=dtype).eval()
    fast = fast.to(device=device, dtype=dtype).eval()
    modes = [("eager", original, fast)]
    if args.compile:
        modes.append(("compiled", torch.compile(original), torch.compile(fast)))
    results = []
    for mode, a, b in modes:
        speeds = _measure(a, b, inputs, args, label=f"{mode} ")
        results.append({"mode": mode, **speeds})
    info = {"source": args.source, "model_class": src.model_class, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype, "batch": batch, "input_shape": [batch, *size],
            "warmup": args.warmup, "runs": args.runs, "r": list(plan.r),
            "flops_budget": args.flops_budget, "flop_ratio": plan.ratio,
            "torch": torch.__version__, "results": results}
    rows = [[r["mode"], f"{r['original']:.1f}", f"{r['rewritten']:.1f}", f"{r['speedup']:.2f}x"]
            for r in results]
    print(f"tome-fx bench: {args.source} on {info['device_name']} ({args.dtype}, batch {batch}, "
          f"input {'x'.join(map(str, size))}, median of {args.runs} runs after {args.warmup} warm-up)")
    print(f"r per block: {list(plan.r)}" + (f", FLOP ratio {plan.ratio:.4f}" if plan.ratio else ""))
    print(tabulate(rows, headers=["mode", "original /s", "rewritten /s", "speed-up"],
                   tablefmt="simple"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def visualize(args) -> int:
    import torch

    from .. import api

    from . import visualize as vis
    from .sources import declared_size
    from ..track import track_sources

    _check(args)
    src = _source(args)
    size = args.size or declared_size(src)
    mean, std = vis.normalization(src.model)
    x, image = vis.load_image(args.image, size, mean, std)
    fast = api.optimize(src.target, r=args.r_value, flops_budget=args.flops_budget,
                            example_inputs=(x,))
    tracked = track_sources(fast, x)
    num = tracked.num_blocks
    layer = num - 1 if args.layer is None else args.layer
    if not -num <= layer < num:
        raise ValueError(f"--layer {args.layer} is out of range: the model has {num} blocks (0..{num - 1})")
    layer %= num
    sources = tracked.at(layer)
    prefix = tracked.prefix
    if sources is None:  # nothing merged up to this block: every patch is its own group
        patches = fast.tome.blocks[0].tokens_in - prefix
        groups = torch.arange(patches)
    else:
        groups = vis.group_ids(sources[0], prefix)
        patches = len(groups)
    rows, cols = vis.patch_grid(patches, size[1], size[2], src.model)
    img = vis.render(image, groups.reshape(rows, cols).numpy(), args.scale)
    img.save(args.output, format="PNG")
    n_groups = len(set(groups.tolist()))
    print(f"wrote {args.output} ({img.width}x{img.height}): merge groups after block {layer}, "
          f"{n_groups} groups of {patches} patches ({rows}x{cols} grid), r per block {list(fast.tome.r)}")
    return 0


def export(args) -> int:
    from .. import api
    from ..exporting import export_format, require_onnx
    from .sources import example_inputs

    _check(args)
    if export_format(args.output) == "onnx":  # fast one-line errors before loading the model
        require_onnx()
    src = _source(args)
    inputs = example_inputs(src, args.size, args.batch_size)
    fast = api.optimize(src.target, r=args.r_value, flops_budget=args.flops_budget,
                        example_inputs=inputs)
    plan = fast.tome
    ratio = f", FLOP ratio {plan.ratio:.4f}" if plan.ratio else ""
    print(f"{args.source}: r per block {list(plan.r)}{ratio}")
    api.export(fast, args.output, inputs)
    return 0


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, default_batch: str) -> None:
    p.add_argument("source", help=SOURCE_HELP)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--flops-budget", type=float, default=None, metavar="B",
                     help="keep at most this fraction of the original FLOPs, in (0, 1]")
    how.add_argument("--r", default=None, metavar="R",
                     help="tokens merged per block: an int or a list a,b,c (default 8)")
    p.add_argument("--input-size", default=None, metavar="C,H,W",
                   help="one input's shape without the batch, e.g. 3,224,224 (default: what "
                        "the model declares)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help=default_batch)
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled model (runs code from the file)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="state dict to load into a timm:NAME model (strict)")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _timing(p: argparse.ArgumentParser, runs: int) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to time (auto: CUDA when present)")
    p.add_argument("--runs", type=int, default=runs, help=f"timed runs, median reported (default {runs})")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default 3)")


def _subcommand(sub, name: str, func, summary: str, description: str, epilog: str,
                batch_help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=description, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, batch_help)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tome-fx", description="Token Merging (ToMe) as a torch.fx graph pass",
                     epilog="example:\n  tome-fx report timm:vit_small_patch16_224 --flops-budget 0.5\n"
                            "run 'tome-fx COMMAND --help' for a command's options",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    rep = _subcommand(sub, "report", report, "blocks found, merges and FLOPs per block, fidelity",
                      "Show what tome_fx does to a model: per-block merges and FLOPs,\n"
                      "protected tokens, skipped sites, totals, fidelity.", REPORT_EPILOG,
                      "batch of random inputs for planning and fidelity (default 2)")
    rep.add_argument("--strategy", choices=["auto", "constant", "decreasing"], default="auto",
                     help="schedule shape for --flops-budget (default auto)")
    rep.add_argument("--format", choices=["table", "markdown", "json"], default="table")
    rep.add_argument("--bench", action="store_true", help="also measure throughput of both models")
    _timing(rep, runs=5)

    ben = _subcommand(sub, "bench", bench, "throughput of original vs rewritten (eager, compiled)",
                      "Measure throughput (batch items per second) of the original and\n"
                      "the rewritten model: warm-up, then the median of timed runs.", BENCH_EPILOG,
                      "batch size to time (default 32 on CUDA, 8 on CPU)")
    ben.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ben.add_argument("--compile", action="store_true", help="also time torch.compile'd versions")
    ben.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    _timing(ben, runs=10)

    vis = _subcommand(sub, "visualize", visualize, "draw the merge groups of one image",
                      "Run one image through the rewritten model and draw which patches\n"
                      "were merged together after a block (default: the last).", VISUALIZE_EPILOG,
                      argparse.SUPPRESS)
    vis.add_argument("image", help="image file (any format Pillow reads); resized to the input size")
    vis.add_argument("-o", "--output", required=True, help="PNG to write")
    vis.add_argument("--layer", type=int, default=None, metavar="K",
                     help="draw the groups after block K (default: the last block)")
    vis.add_argument("--scale", type=int, default=2, help="pixels per input pixel (default 2)")

    exp = _subcommand(sub, "export", export, "write the rewritten model as ONNX or .pt2, checked",
                      "Rewrite the model and write it as ONNX (.onnx) or a torch.export\n"
                      "archive (.pt2) with a dynamic batch; the file is loaded, run and\n"
                      "compared with the rewritten module.", EXPORT_EPILOG,
                      "batch of the example inputs (default 2)")
    exp.add_argument("-o", "--output", required=True, metavar="FILE",
                     help="file to write: .onnx or .pt2 (the format follows the suffix)")
    return parser


def _quiet_torch_logs() -> None:
    import logging

    import torch

    try:
        torch._logging.set_logs(all=logging.ERROR)
    except Exception:  # private API: fall back to the root of torch's loggers
        logging.getLogger("torch").setLevel(logging.ERROR)


def main(argv=None) -> int:
    global _STDERR
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        return args.func(args)
    # Errors are one line: warnings and torch log records are off, and what libraries print to
    # stderr meanwhile (torch.export prints partial graphs when it fails) is held back; it is
    # passed on after a success and dropped after an error. --debug shows everything.
    warnings.simplefilter("ignore")
    _quiet_torch_logs()
    _STDERR, held = sys.stderr, io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            code = args.func(args)
    except KeyboardInterrupt:
        print("tome-fx: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from ..errors import TomeError, one_line

        known = (TomeError, ValueError, TypeError, NotImplementedError, OSError)
        msg = one_line(exc)
        if not isinstance(exc, known):
            msg = f"{type(exc).__name__}: {msg}"
        print(f"tome-fx: error: {msg}", file=sys.stderr)
        return 2
    sys.stderr.write(held.getvalue())
    return code


if __name__ == "__main__":
    sys.exit(main())
