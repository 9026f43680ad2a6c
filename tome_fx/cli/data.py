"""``--data`` for ``report``, ``bench`` and ``sweep``: the options, loading, and the split
into calibration and evaluation inputs."""
from __future__ import annotations

import argparse
import os
import sys

DATA_HELP = ("real inputs: a folder of images (class sub-folders give labels), a .npz with "
             "'images' uint8 [N,H,W,C] (and 'labels'), or a .txt file of one sentence per line "
             "(HuggingFace text models)")


def add_options(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--data", required=required, default=None, metavar="PATH", help=DATA_HELP)
    p.add_argument("--calib", type=int, default=64, metavar="N",
                   help="inputs of --data (a seeded random subset) that choose the schedule; the "
                        "rest are evaluated (default 64)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use only the first N inputs of --data")
    p.add_argument("--mean", default=None, metavar="M,M,M",
                   help="per-channel mean the images are normalised with, for a source without "
                        "a preprocessing config (.pt2, pickled module)")
    p.add_argument("--std", default=None, metavar="S,S,S", help="per-channel std, as --mean")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (they are off anyway when stderr is not a terminal)")


def floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise ValueError(f"{flag} must be numbers separated by commas, got {text!r}")
    return values


def check(args) -> None:
    """Option errors before anything loads."""
    args.mean_values, args.std_values = floats(args.mean, "--mean"), floats(args.std, "--std")
    if (args.mean or args.std) and not args.data:
        raise ValueError("--mean and --std describe --data: pass --data PATH too")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.calib < 0:
        raise ValueError(f"--calib must be >= 0, got {args.calib}")


def bar_factory(args, stream):
    from ..timing import progress

    return lambda total, desc: progress(total, desc, True if args.quiet else None, file=stream)


def load(args, src, stream=None, path=None):
    """The ``Data`` of ``--data`` (or of ``path``, all of it) for source ``src``, preprocessed
    as the model's config (or ``--mean``/``--std``/``--input-size``) says."""
    return listing(args, src, stream, path).load()


def listing(args, src, stream=None, path=None):
    """``load``'s items found but not decoded yet (a ``data.Listing``)."""
    from ..data import open_data
    from .sources import declared_size

    size = args.size
    if size is None and args.mean_values is not None and src.example_inputs:
        size = declared_size(src)  # a .pt2's recorded input size
    model_dir = src.name if os.path.isdir(src.name) else None
    return open_data(path or args.data, src.model, mean=args.mean_values, std=args.std_values,
                     input_size=size, model_dir=model_dir, limit=None if path else args.limit,
                     bar=bar_factory(args, stream or sys.stderr))


def split(args, data):
    """(calibration ``Data`` or None, evaluation ``Data``) by ``--calib``."""
    if args.calib == 0:
        return None, data
    return data.split(args.calib)
