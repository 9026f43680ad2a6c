"""``tome-fx sweep``: ``tome_fx.sweep`` on a model source and ``--data``."""
from __future__ import annotations

from . import data as cli_data


def budgets(text: str) -> list[float]:
    from ..cost import check_budget

    values = cli_data.floats(text, "--budgets")
    return [check_budget(b) for b in values]


def device(name: str):
    """``--device``: a GPU is this process's one (``distributed.local_cuda``)."""
    import torch

    from ..distributed import local_cuda

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return local_cuda() if cuda else torch.device("cpu")


def run(args, load_source, stream) -> int:
    from ..cost import STRATEGIES
    from ..timing import cpu_threads

    chosen = [s.strip() for s in args.strategy.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown or not chosen:
        raise ValueError(f"--strategy takes names from {', '.join(STRATEGIES)} separated by "
                         f"commas, got {args.strategy!r}")
    wanted = budgets(args.budgets)
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout:g}")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise ValueError(f"--plot writes a PNG: give a file name ending in .png, got {args.plot}")
    where = device(args.device)
    with cpu_threads(args.threads):
        return _run(args, load_source, stream, where, chosen, wanted)


def _run(args, load_source, stream, where, chosen, wanted) -> int:
    from ..distributed import session
    from ..sweep import sweep

    # under torchrun: one process group from here on, so that a rank failing to load the model
    # or the data stops every rank with its error instead of leaving them waiting
    with session(where, args.dist_timeout) as group:
        args.quiet = args.quiet or not group.main  # bars on rank 0 only
        with group.step():
            src = load_source(args)
            src.model.to(where)  # ours: loaded here
            data = cli_data.listing(args, src, stream)  # each process decodes only its share
            calibration = args.calib
            if args.calib_data:
                calib = cli_data.listing(args, src, stream, path=args.calib_data)
                keep_all = args.calib == 0 or args.calib >= len(calib)
                calibration = calib if keep_all else calib.split(args.calib)[0]
        result = sweep(src.target, data, wanted, chosen, calibration=calibration,
                       batch_size=args.batch_size or 64, measure=not args.no_throughput,
                       warmup=args.warmup, runs=args.runs, quiet=True if args.quiet else None,
                       name=args.source, original=src.model, bar_stream=stream,
                       timeout=args.dist_timeout)
        with group.step():  # rank 0 reports; the others write nothing
            if group.main:
                _report(args, result)
    return 0


def _report(args, result) -> None:
    print(result)
    if args.json:
        result.save_json(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
