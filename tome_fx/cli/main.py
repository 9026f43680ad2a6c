"""``tome-fx`` command line: ``report``, ``bench``, ``sweep``, ``visualize`` and ``export``.

Every failure is one line on stderr, ``tome-fx: error: ...``, exit code 2; ``--debug`` shows
the traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import warnings

from . import commands
from .commands import bench, export, report, sweep, visualize
from .data import add_options as add_data_options
from .diffusion import add_options as add_diffusion_options

SOURCE_HELP = ("model: timm:NAME (random weights unless --checkpoint), a .pt/.pth file saved with "
               "torch.save(model) (needs --trust-pickle), a .pt2 archive from torch.export.save, "
               "a local HuggingFace model directory, or a diffusers pipeline or model directory "
               "(report and bench; ToMeSD)")

REPORT_EPILOG = """examples:
  tome-fx report timm:vit_small_patch16_224 --flops-budget 0.5
  tome-fx report model.pt --trust-pickle --r 8 --format markdown
  tome-fx report timm:deit_small_patch16_224 --checkpoint deit_s.pth --flops-budget 0.6 --bench
  tome-fx report exported.pt2 --format json > report.json
  tome-fx report ./bert --seq-len 128 --flops-budget 0.5
  tome-fx report timm:deit_small_patch16_224 --checkpoint deit_s.pth --data val/ --flops-budget 0.5
  tome-fx report ./stable-diffusion-v1-5 --ratio 0.5      (a diffusers folder: ToMeSD)

Without --data the fidelity line is on random inputs and the default strategy applies its
data-free rule; --data PATH gives real inputs: --calib N of them choose the schedule, the rest
measure fidelity (and accuracy, with labels)."""

BENCH_EPILOG = """examples:
  tome-fx bench timm:vit_base_patch16_224 --flops-budget 0.5 --batch-size 64 --dtype float16 --compile
  tome-fx bench model.pt --trust-pickle --r 8 --device cpu --runs 5 --json bench.json
  tome-fx bench ./minilm --data sentences.txt --flops-budget 0.5 --batch-size 32
  tome-fx bench ./sdxl/unet --flops-budget 0.7 --input-size 4,64,64 --compile   (ToMeSD)"""

SWEEP_EPILOG = """examples:
  tome-fx sweep timm:deit_small_patch16_224 --checkpoint deit_s.pth --data val/ --plot sweep.png
  tome-fx sweep vit.pt2 --data cifar_test/ --mean 0.4914,0.4822,0.4465 --std 0.2023,0.1994,0.2010
  tome-fx sweep ./all-MiniLM-L6-v2 --data sentences.txt --budgets 1,0.75,0.5 --json sweep.json
  torchrun --nproc_per_node 8 -m tome_fx sweep timm:deit_small_patch16_224 --data val/

Per budget and strategy: FLOP ratio, top-1 (with labels), agreement with the original's
predictions, output cosine, nearest-neighbour agreement (text and other embedding outputs),
throughput on the first batch, each row timed in the same rounds as the original (on
--device; --no-throughput skips it). The default strategy is compared with constant r input by
input (exact McNemar p). A .pt2 saved with a static batch runs as calls of that batch.
Under torchrun each process evaluates a share of the batches (one GPU per local rank, or
--device cpu); rank 0 plans, reports and writes; items/s is the sum over the processes."""

VISUALIZE_EPILOG = """examples:
  tome-fx visualize timm:vit_small_patch16_224 photo.jpg -o groups.png --r 16
  tome-fx visualize model.pt --trust-pickle photo.jpg -o groups.png --flops-budget 0.5 --layer 5"""


EXPORT_EPILOG = """examples:
  tome-fx export timm:vit_small_patch16_224 --flops-budget 0.5 -o vit_s_half.onnx
  tome-fx export model.pt --trust-pickle --r 8 -o fast.pt2
  tome-fx export ./bert --data sentences.txt --calib 64 --flops-budget 0.5 -o bert_half.onnx
  tome-fx export ./bert --seq-len 128 --r 8 -o bert.pt2

A text model (a HuggingFace directory with a tokenizer) takes --data FILE.txt (--calib N of its
sentences choose the schedule, the first --batch-size of them are the example inputs) or
--seq-len N (random token ids).

The format follows the suffix (.onnx needs: pip install -e ".[export]"). The file is loaded and
run on the example inputs and on one more batch size; the largest difference to the rewritten
module is printed, and above 1e-4 (fp32) it is an error."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one ``tome-fx: error:`` line."""

    def error(self, message):
        sys.stderr.write(f"tome-fx: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, default_batch: str, budget: bool = True) -> None:
    p.add_argument("source", help=SOURCE_HELP)
    if budget:
        how = p.add_mutually_exclusive_group()
        how.add_argument("--flops-budget", type=float, default=None, metavar="B",
                         help="keep at most this fraction of the original FLOPs, in (0, 1]")
        how.add_argument("--r", default=None, metavar="R",
                         help="tokens merged per block: an int or a list a,b,c (default 8)")
        p.add_argument("--min-tokens", type=_floor, default="auto", metavar="N",
                       help="no sample is merged below N tokens (default auto: 24 for text "
                            "models, none for images; 0: no floor)")
    p.add_argument("--input-size", default=None, metavar="C,H,W",
                   help="one input's shape without the batch, e.g. 3,224,224 (default: what "
                        "the model declares)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help=default_batch)
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled model (runs code from the file)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="state dict to load into a timm:NAME model (strict)")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _floor(text: str):
    """``--min-tokens``: what ``optimize(min_tokens=)`` takes (``cost.floor.check_min_tokens``)."""
    from ..cost.floor import check_min_tokens

    try:
        return check_min_tokens(text if text == "auto" else int(text))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 0, got {text!r}") from None


def _seq_len(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="a text model (HuggingFace directory): random token ids of N tokens "
                        "(or give sentences with --data FILE.txt)")


def _timing(p: argparse.ArgumentParser, runs: int) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to time (auto: CUDA when present)")
    p.add_argument("--runs", type=int, default=runs, help=f"timed runs, median reported (default {runs})")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default 3)")


def _threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads torch computes with (default: what it has, "
                        "torch.get_num_threads()); the output says the count and warns when "
                        "the load average exceeds the cores: on a shared CPU, 1 gives "
                        "speed-ups that hold")


def _subcommand(sub, name: str, func, summary: str, description: str, epilog: str,
                batch_help: str, budget: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=description, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, batch_help, budget)
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
    _seq_len(rep)
    _timing(rep, runs=5)
    add_data_options(rep)
    add_diffusion_options(rep)

    ben = _subcommand(sub, "bench", bench, "throughput of original vs rewritten (eager, compiled)",
                      "Measure throughput (batch items per second) of the original and\n"
                      "the rewritten model: warm-up, then the median of timed runs.", BENCH_EPILOG,
                      "batch size to time (default 32 on CUDA, 8 on CPU)")
    ben.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ben.add_argument("--compile", action="store_true", help="also time torch.compile'd versions")
    ben.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    _seq_len(ben)
    _timing(ben, runs=10)
    _threads(ben)
    add_data_options(ben)
    add_diffusion_options(ben)

    swp = _subcommand(sub, "sweep", sweep, "accuracy vs FLOPs and throughput on your data",
                      "Rewrite the model at every budget with every strategy and measure\n"
                      "each on --data: accuracy, agreement, cosine, throughput; table,\n"
                      "JSON and a plot.", SWEEP_EPILOG,
                      "inputs per batch (default 64)", budget=False)
    swp.add_argument("--budgets", default="1,0.9,0.8,0.7,0.6,0.5", metavar="B,B,...",
                     help="FLOP budgets (default 1,0.9,0.8,0.7,0.6,0.5; 1 is the original)")
    swp.add_argument("--strategy", default="auto,constant", metavar="S,S",
                     help="schedule strategies to compare: auto, constant, decreasing "
                          "(default auto,constant)")
    swp.add_argument("--calib-data", default=None, metavar="PATH",
                     help="a separate calibration set (then all of --data is evaluated)")
    swp.add_argument("--no-throughput", action="store_true", help="skip timing")
    swp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="where the models run (auto: CUDA when present; under torchrun, "
                          "each process on the GPU of its local rank)")
    swp.add_argument("--dist-timeout", type=float, default=1800, metavar="SECONDS",
                     help="under torchrun: how long a process waits for the others (rank 0 "
                          "plans alone) before the job stops with an error (default 1800)")
    swp.add_argument("--runs", type=int, default=5, help="timed runs per module (default 5)")
    swp.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs (default 2)")
    _threads(swp)
    swp.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    swp.add_argument("--plot", default=None, metavar="FILE.png",
                     help="accuracy vs FLOP ratio and vs throughput (needs matplotlib)")
    add_data_options(swp, required=True)

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
    _seq_len(exp)
    add_data_options(exp)
    return parser


def _quiet_torch_logs() -> None:
    import logging

    import torch

    try:
        torch._logging.set_logs(all=logging.ERROR)
    except Exception:  # private API: fall back to the root of torch's loggers
        logging.getLogger("torch").setLevel(logging.ERROR)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        return args.func(args)
    # Errors are one line: warnings and torch log records are off, and what libraries print to
    # stderr meanwhile (torch.export prints partial graphs when it fails) is held back; it is
    # passed on after a success and dropped after an error. --debug shows everything.
    warnings.simplefilter("ignore")
    _quiet_torch_logs()
    commands.STDERR, held = sys.stderr, io.StringIO()
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
