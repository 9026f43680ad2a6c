"""``tome-fx`` command line. ``report`` shows what tome_fx would do to a model."""
from __future__ import annotations

import argparse
import sys

import torch

from .errors import TomeError


def _load(source: str):
    if source.startswith("timm:"):
        import timm

        name = source[len("timm:") :]
        try:
            return timm.create_model(name, pretrained=False).eval()
        except Exception as exc:  # timm raises RuntimeError for unknown names
            raise ValueError(f"cannot build timm model {name!r}: {exc}") from exc
    raise ValueError(f"unsupported model source {source!r} (use timm:NAME)")


def _parse_r(text: str):
    parts = [p for p in text.split(",") if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--r must be an int or a comma-separated list of ints, got {text!r}")
    return values[0] if len(values) == 1 else values


def report(args) -> int:
    import tome_fx

    model = _load(args.source)
    inputs = tome_fx.api.default_inputs(model, batch=args.batch_size)
    if args.flops_budget is not None and args.r is not None:
        raise ValueError("pass either --r or --flops-budget, not both")
    if args.flops_budget is not None:
        fast = tome_fx.optimize(model, flops_budget=args.flops_budget, example_inputs=inputs)
    else:
        fast = tome_fx.optimize(model, r=_parse_r(args.r or "8"), example_inputs=inputs)
    with torch.no_grad():
        ref, out = model(*inputs), fast(*inputs)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1)).mean().item()
    top1 = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    print(fast.tome)
    print(f"rewrites: {fast.tome_counts}")
    print(f"fidelity on {len(ref)} random inputs: cosine {cos:.4f}, top-1 agreement {top1:.2%}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tome-fx", description="Token Merging as a graph pass")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report",
        help="show blocks found, merges per block and fidelity",
        epilog="example: tome-fx report timm:vit_small_patch16_224 --flops-budget 0.5",
    )
    rep.add_argument("source", help="model source: timm:NAME")
    rep.add_argument("--r", default=None, help="tokens merged per block (int or list a,b,c; default 8)")
    rep.add_argument("--flops-budget", type=float, default=None,
                     help="fraction of the original FLOPs to keep, in (0, 1]")
    rep.add_argument("--batch-size", type=int, default=2)
    rep.set_defaults(func=report)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (TomeError, ValueError, TypeError, NotImplementedError, OSError) as exc:
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"tome-fx: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
