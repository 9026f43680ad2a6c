"""What each ``tome-fx`` subcommand does: ``report``, ``bench``, ``sweep``, ``visualize``,
``export`` (the parser and error handling are in ``main``)."""
from __future__ import annotations

import json

STDERR = None  # the real stderr while main() holds back library output (progress bars go here)


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

    if getattr(args, "flops_budget", None) is not None:
        check_budget(args.flops_budget)
        args.r_value = None
    else:
        args.r_value = _parse_r(getattr(args, "r", None))
    args.size = parse_input_size(args.input_size)
    if getattr(args, "seq_len", None) is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if getattr(args, "runs", 1) < 1 or getattr(args, "warmup", 0) < 0:
        raise ValueError(f"need --runs >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}")
    if hasattr(args, "calib"):
        from .data import check

        check(args)


def _source(args):
    import os

    from . import diffusion
    from .sources import load

    if os.path.isdir(args.source) and diffusion.is_directory(args.source):
        return diffusion.load(args.source)
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
    """Throughput of both modules, timed in the same rounds: {"original": items/s,
    "rewritten": ..., "speedup": ...}."""
    from ..timing import compare
    from .data import bar_factory

    with bar_factory(args, STDERR)(2 * (args.warmup + args.runs), f"{label}timing") as bar:
        return compare(original, rewritten, inputs, args.warmup, args.runs, bar)


def _optimize(args, src, inputs, calibration=None):
    """(``api.optimize`` of the source on ``inputs``, the inputs it was given): a program
    fixed at one batch gets as many as it takes, ``calibration`` runs in chunks of it."""
    from .. import api
    from ..graph.batches import fit_batch, static_batch

    fixed = static_batch(src.target)
    if fixed is not None:
        inputs = fit_batch(inputs, fixed)
    fast = api.optimize(src.target, r=args.r_value, flops_budget=args.flops_budget,
                        example_inputs=inputs, calibration=calibration,
                        min_tokens=getattr(args, "min_tokens", "auto"))
    return fast, inputs


def _r_applied(args, plan) -> str:
    """``r per block [...]``, saying so where ``--r`` asked more than a block can merge."""
    from ..schedule import parse_r

    line = f"r per block {list(plan.r)}"
    if args.r_value is None or not plan.blocks:
        return line
    asked = parse_r(args.r_value, len(plan.blocks))
    refused = {s.site for s in plan.skipped}  # merging nothing for their reason, not capped
    capped = [b.index for b, want in zip(plan.blocks, asked)
              if b.r < want and not b.dropped and b.site not in refused]
    if capped:
        line += (f" (--r {args.r} capped in block(s) {', '.join(map(str, capped))}: a block "
                 f"merges at most half its unprotected tokens)")
    return line


def _data(args, src):
    """(calibration inputs or None, evaluation Data or None) from --data."""
    from . import data as cli_data

    if not args.data:
        return None, None
    calib, rest = cli_data.split(args, cli_data.load(args, src, STDERR))
    return (None if calib is None else calib.inputs()), rest


def _to(inputs, device, dtype=None):
    """Inputs on ``device``; floating tensors in ``dtype`` (token ids stay integers)."""
    def move(t):
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point()
                    else t.dtype)
    if isinstance(inputs, dict):
        return {k: move(v) for k, v in inputs.items()}
    return tuple(move(t) for t in inputs)


# ---------------------------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------------------------

def report(args) -> int:
    from . import report as rep
    from .sources import example_inputs

    from ..graph.batches import batched, fit_batch, static_batch
    from ..timing import batch_size as batch_of
    from . import diffusion
    from .data import bar_factory

    _check(args)
    src = _source(args)
    if diffusion.uses_tomesd(args, src):  # ToMeSD on a diffusion model (cli/diffusion.py)
        return diffusion.report(args, src, _measure, _device, _to)
    calib, evaluate = _data(args, src)
    inputs = (calib if calib is not None else evaluate.inputs(0, args.batch_size or 2)
              if evaluate is not None else example_inputs(src, args.size, args.batch_size,
                                                          seq_len=args.seq_len))
    fixed = static_batch(src.target)
    if fixed is not None:  # a program fixed at one batch: plan on that many, calibrate in chunks
        inputs = fit_batch(inputs, fixed)
    data, fast = rep.build(src.target, src.model, inputs, r=args.r_value,
                           flops_budget=args.flops_budget, strategy=args.strategy,
                           calibration=calib, evaluate=evaluate, min_tokens=args.min_tokens,
                           bar=bar_factory(args, STDERR))
    data["source"] = args.source
    if data["request"]["r"] is not None:
        data["request"]["applied"] = _r_applied(args, fast.tome)
    if args.bench:
        device = _device(args.device)
        moved = _to(inputs, device)
        speeds = _measure(batched(src.model.to(device)), batched(fast.to(device)), moved, args)
        data["bench"] = {"device": str(device), "dtype": "float32", "batch": batch_of(moved),
                         "warmup": args.warmup, "runs": args.runs, **speeds}
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print(rep.format_text(data, args.format))
    return 0


def bench(args) -> int:
    from ..timing import busy_cpu, cpu_threads

    _check(args)
    with cpu_threads(args.threads) as threads:
        device = _device(args.device)
        # before loading: the load of other processes, not of this one's planning
        busy = busy_cpu(threads) if device.type == "cpu" else None
        return _bench(args, device, threads, busy)


def _bench(args, device, threads: int, busy: str | None) -> int:
    import torch
    from tabulate import tabulate

    from ..graph.batches import batched, static_batch
    from ..timing import batch_size as batch_of, cores
    from . import diffusion
    from .sources import example_inputs

    dtype = getattr(torch, args.dtype)
    src = _source(args)
    if diffusion.uses_tomesd(args, src):  # ToMeSD on a diffusion model (cli/diffusion.py)
        return diffusion.bench(args, src, _measure, _device)
    fixed = static_batch(src.target)  # a .pt2 with a static batch runs as calls of that size
    recorded = src.example_inputs  # an ExportedProgram's: its batch may be fixed
    batch = args.batch_size or fixed or (len(recorded[0]) if recorded else
                                         32 if device.type == "cuda" else 8)
    calib, evaluate = _data(args, src)
    if evaluate is not None:  # real inputs: plan on --calib of them, time a batch of the rest
        fast, _ = _optimize(args, src, calib if calib is not None else evaluate.inputs(0, batch),
                            calib)
        inputs = evaluate.inputs(0, batch)
    else:
        fast, _ = _optimize(args, src, example_inputs(src, args.size, batch if recorded else
                                                      min(batch, 2), seq_len=args.seq_len))
        inputs = example_inputs(src, args.size, batch, seq_len=args.seq_len)
    inputs = _to(inputs, device, dtype)
    first = next(iter(inputs.values() if isinstance(inputs, dict) else inputs))
    size = tuple(first.shape[1:])
    batch = batch_of(inputs)
    plan = fast.tome
    # the sources are in eval mode already; an ExportedProgram's module refuses .eval()
    original = batched(src.model.to(device=device, dtype=dtype))
    fast = batched(fast.to(device=device, dtype=dtype))
    modes = [("eager", original, fast)]
    if args.compile:
        modes.append(("compiled", torch.compile(original), torch.compile(fast)))
    results = []
    for mode, a, b in modes:
        speeds = _measure(a, b, inputs, args, label=f"{mode} ")
        results.append({"mode": mode, **speeds})
    info = {"source": args.source, "data": args.data, "model_class": src.model_class,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": args.dtype, "batch": batch, "input_shape": [batch, *size],
            "static_batch": fixed, "warmup": args.warmup, "runs": args.runs, "r": list(plan.r),
            "flops_budget": args.flops_budget, "flop_ratio": plan.ratio,
            "threads": threads, "cores": cores(), "cpu_warning": busy,
            "torch": torch.__version__, "results": results}
    rows = [[r["mode"], f"{r['original']:.1f}", f"{r['rewritten']:.1f}", f"{r['speedup']:.2f}x"]
            for r in results]
    calls = (f"; the program's batch is fixed at {fixed}: {-(-batch // fixed)} calls per batch"
             if fixed is not None and fixed != batch else "")
    print(f"tome-fx bench: {args.source} on {info['device_name']} ({args.dtype}, batch {batch}, "
          f"input {'x'.join(map(str, size))}, {threads} CPU thread(s), median of {args.runs} "
          f"rounds after {args.warmup} warm-up, original and rewritten alternating{calls})")
    if busy:
        print(f"warning: {busy}")
    print(_r_applied(args, plan) + (f", FLOP ratio {plan.ratio:.4f}" if plan.ratio else ""))
    print(tabulate(rows, headers=["mode", "original /s", "rewritten /s", "speed-up"],
                   tablefmt="simple"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def visualize(args) -> int:
    import torch

    from . import visualize as vis
    from .sources import declared_size, is_text
    from ..track import track_sources

    _check(args)
    src = _source(args)
    if is_text(src):
        raise ValueError(f"visualize draws merge groups over an image; {src.model_class} is a "
                         f"text model")
    size = args.size or declared_size(src)
    mean, std = vis.normalization(src.model)
    x, image = vis.load_image(args.image, size, mean, std)
    fast, inputs = _optimize(args, src, (x,))
    tracked = track_sources(fast, *inputs)  # the image first (repeated for a static batch)
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
          f"{n_groups} groups of {patches} patches ({rows}x{cols} grid), {_r_applied(args, fast.tome)}")
    return 0


def export(args) -> int:
    from .. import api
    from ..export_files import export_format, require_onnx
    from ..graph.batches import fit_batch
    from . import data as cli_data
    from .sources import example_inputs

    _check(args)
    if export_format(args.output) == "onnx":  # fast one-line errors before loading the model
        require_onnx()
    src = _source(args)
    batch, calib = args.batch_size or 2, None
    if args.data:  # nothing is evaluated: --calib N of them (all if fewer) choose the schedule
        data = cli_data.load(args, src, STDERR)
        if 0 < args.calib < len(data):
            data = data.split(args.calib)[0]
        pool = data.inputs()  # one batch: sentences padded to one length
        calib = pool if args.calib else None
        inputs = fit_batch(pool, min(batch, len(data)))
    else:
        inputs = example_inputs(src, args.size, args.batch_size, seq_len=args.seq_len)
    fast, inputs = _optimize(args, src, inputs, calib)
    plan = fast.tome
    ratio = f", FLOP ratio {plan.ratio:.4f}" if plan.ratio else ""
    print(f"{args.source}: {_r_applied(args, plan)}{ratio}")
    api.export(fast, args.output, inputs)
    return 0


def sweep(args) -> int:
    from .sweep import run

    _check(args)
    return run(args, _source, STDERR)
