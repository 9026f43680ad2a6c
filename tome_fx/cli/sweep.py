"""``tome-fx sweep``: ``tome_fx.sweep`` on a model source and ``--data``."""
from __future__ import annotations

from . import data as cli_data


def budgets(text: str) -> list[float]:
    from ..cost import check_budget

    values = cli_data.floats(text, "--budgets")
    return [check_budget(b) for b in values]


def run(args, load_source, stream) -> int:
    from ..cost import STRATEGIES
    from ..sweep import sweep

    chosen = [s.strip() for s in args.strategy.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown or not chosen:
        raise ValueError(f"--strategy takes names from {', '.join(STRATEGIES)} separated by "
                         f"commas, got {args.strategy!r}")
    wanted = budgets(args.budgets)
    if args.plot and not args.plot.lower().endswith(".png"):
        raise ValueError(f"--plot writes a PNG: give a file name ending in .png, got {args.plot}")
    src = load_source(args)
    data = cli_data.load(args, src, stream)
    calibration = args.calib
    if args.calib_data:
        calib = cli_data.load(args, src, stream, path=args.calib_data)
        keep_all = args.calib == 0 or args.calib >= len(calib)
        calibration = calib if keep_all else calib.split(args.calib)[0]
    result = sweep(src.target, data, wanted, chosen, calibration=calibration,
                   batch_size=args.batch_size or 64, measure=not args.no_throughput,
                   warmup=args.warmup, runs=args.runs, quiet=True if args.quiet else None,
                   name=args.source, original=src.model, bar_stream=stream)
    print(result)
    if args.json:
        result.save_json(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0
