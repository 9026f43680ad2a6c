"""Diffusers model directories on the command line: loading (``model_index.json`` with a
``unet/`` or ``transformer/`` folder, or such a folder itself), and ``report`` and ``bench``
with ``--method tomesd`` (the default for them)."""
from __future__ import annotations

import json
import os

from ..errors import one_line
from .sources import SEED, Source, SourceError

DENOISERS = ("unet", "transformer")  # the pipeline component tome_fx rewrites


CLI_METHODS = ("tome", "tomesd")  # the methods this command line has options for


def add_options(p) -> None:
    from ..methods import method_names
    p.add_argument("--method", choices=method_names(), default=None,
                   help="tome (default) or tomesd: ToMeSD's local merging (the default for a "
                        "diffusers model directory); the others from tome_fx.optimize(method=)")
    p.add_argument("--ratio", type=float, default=None, metavar="R",
                   help="tomesd: share of tokens merged in each merged op, in [0, 1) "
                        "(default 0.5 without --flops-budget)")
    p.add_argument("--max-downsample", type=int, default=None, metavar="D",
                   help="tomesd: merge at levels downsampled at most D times (default: the "
                        "finest level that has attention)")
    p.add_argument("--merge", default="attn", metavar="OPS",
                   help="tomesd: ops to merge around, a comma list of attn, crossattn, mlp "
                        "(default attn)")


def is_directory(path: str) -> bool:
    """A diffusers pipeline (model_index.json) or model (config.json with _class_name) folder."""
    if os.path.exists(os.path.join(path, "model_index.json")):
        return True
    return "_class_name" in _json(os.path.join(path, "config.json"))


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load(path: str) -> Source:
    """The denoiser of a diffusers pipeline folder (its ``unet`` or ``transformer``), or the model
    of a diffusers model folder, with random example inputs from its config."""
    folder = path
    if os.path.exists(os.path.join(path, "model_index.json")):
        index = _json(os.path.join(path, "model_index.json"))
        found = [name for name in DENOISERS if name in index]
        if not found:
            raise SourceError(f"{path}: model_index.json names no {' or '.join(DENOISERS)}")
        folder = os.path.join(path, found[0])
    config = _json(os.path.join(folder, "config.json"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach the hub
    try:
        import diffusers
    except ImportError:
        raise SourceError("loading a diffusers model directory needs diffusers "
                          "(pip install diffusers)") from None
    diffusers.utils.logging.set_verbosity_error()
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise SourceError(f"{folder}: unknown diffusers class {config.get('_class_name')!r}")
    try:
        model = cls.from_pretrained(folder).eval()
    except Exception as exc:
        raise SourceError(f"cannot load {cls.__name__} from {folder}: {one_line(exc)}") from exc
    return Source(path, model, model)


def options(args) -> dict:
    """``optimize`` keyword arguments for ``--method tomesd``."""
    ops = [o.strip() for o in args.merge.split(",") if o.strip()]
    unknown = sorted(set(ops) - {"attn", "crossattn", "mlp"})
    if unknown:
        raise ValueError(f"--merge takes attn, crossattn and mlp, got {', '.join(unknown)}")
    if args.r is not None:
        raise ValueError("--method tomesd takes --ratio or --flops-budget, not --r")
    ratio = args.ratio if args.ratio is not None or args.flops_budget is not None else 0.5
    out = {"method": "tomesd", "flops_budget": args.flops_budget, "ratio": ratio,
           "max_downsample": args.max_downsample, "use_rand": False}
    out.update({f"merge_{op}": op in ops for op in ("attn", "crossattn", "mlp")})
    return out


def inputs(src: Source, args, batch: int):
    import torch

    from ..diffusion import default_inputs
    return default_inputs(src.model, batch, args.size, torch.Generator().manual_seed(SEED))


def uses_tomesd(args, src: Source) -> bool:
    """Whether ``--method`` (default: tomesd for a diffusers model) is tomesd; ValueError for
    tomesd on another model (its inputs come from a diffusers config, and ``optimize`` refuses
    a model without transformer blocks over a 2-D grid: timm's ViT has none)."""
    from ..diffusion import is_diffusers

    method = getattr(args, "method", None)
    if method is not None and method not in CLI_METHODS:
        raise ValueError(f"--method {method} has no command-line options yet: use "
                         f"tome_fx.optimize(model, method={method!r}, ...), or --method "
                         f"{' or '.join(CLI_METHODS)}")
    if method == "tomesd" and not is_diffusers(src.model):
        raise ValueError(f"--method tomesd needs a diffusers model: a pipeline folder with "
                         f"model_index.json (its unet/ or transformer/) or a diffusers model "
                         f"folder (config.json with _class_name); {args.source} is a "
                         f"{src.model_class}: use --method tome")
    return method == "tomesd" or (method is None and is_diffusers(src.model))


# the API's names in optimize's messages -> this command line's options
_OPTIONS = ((r"\bmerge_crossattn=True, merge_mlp=True\b", "--merge attn,crossattn,mlp"),
            (r"\bflops_budget >= ", "--flops-budget >= "), (r"\bflops_budget=", "--flops-budget "),
            (r"\bmax_downsample=", "--max-downsample "))


def _optimize(src: Source, example, args):
    """``optimize`` with tomesd's options; a ValueError names this command line's options
    (``--merge``), not the API's (``merge_mlp=True``)."""
    import re

    from .. import api
    try:
        return api.optimize(src.target, example_inputs=example, **options(args))
    except ValueError as exc:
        text = str(exc)
        if all(op in args.merge for op in ("crossattn", "mlp")):  # no more ops to merge
            text = text.replace("merge more ops (merge_crossattn=True, merge_mlp=True) or ", "")
        for api_name, option in _OPTIONS:
            text = re.sub(api_name, option, text)
        exc.args = (text,)
        raise


def _fidelity(original, fast, example) -> dict:
    import torch

    from ..timing import call
    with torch.no_grad():
        a, b = (call(m, example) for m in (original, fast))
    a, b = (getattr(o, "sample", o[0] if isinstance(o, tuple) else o).float() for o in (a, b))
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    return {"inputs": "random", "samples": len(a), "relative_error": float((b - a).norm() / a.norm()),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def report(args, src: Source, measure, device_of, move) -> int:
    """``tome-fx report`` with ``--method tomesd``: the plan (ops, levels, FLOPs), fidelity on
    random inputs (relative error, cosine), optionally throughput."""
    from ..timing import batch_size

    example = inputs(src, args, args.batch_size or 2)
    fast = _optimize(src, example, args)
    plan = fast.tome
    data = {"source": args.source, "model_class": src.model_class, "method": "tomesd",
            "input_shape": {k: list(v.shape) for k, v in example.items() if hasattr(v, "shape")},
            "request": {"flops_budget": args.flops_budget, "ratio": args.ratio,
                        "max_downsample": args.max_downsample, "merge": args.merge},
            "levels": [{"downsample": lv.downsample, "grid": list(lv.grid), "tokens": lv.tokens,
                        "ratio": lv.ratio, "r": lv.r, "merged_ops": lv.ops,
                        "flops_before": lv.flops_original, "flops_after": lv.flops}
                       for lv in plan.levels],
            "ops": [{"site": b.site, "op": b.kind, "tokens": b.tokens_in, "r": b.r}
                    for b in plan.blocks],
            "skipped": [{"site": s.site, "reason": s.reason} for s in plan.skipped],
            "totals": {"flops_before": plan.flops_original, "flops_after": plan.flops,
                       "flop_ratio": plan.ratio, "predicted_speedup": plan.predicted_speedup},
            "fidelity": _fidelity(src.model, fast, example), "bench": None}
    if args.bench:
        device = device_of(args.device)
        moved = move(example, device)
        speeds = measure(src.model.to(device), fast.to(device), moved, args)
        data["bench"] = {"device": str(device), "dtype": "float32", "batch": batch_size(moved),
                         "warmup": args.warmup, "runs": args.runs, **speeds}
    if args.format == "json":
        print(json.dumps(data, indent=2))
        return 0
    f, b = data["fidelity"], data["bench"]
    shape = next(iter(data["input_shape"].values()))
    print(f"tome-fx report: {args.source} ({src.model_class}), method tomesd, input "
          f"{'x'.join(map(str, shape))}\n")
    print(plan)
    print(f"fidelity on {f['samples']} random inputs: relative output error "
          f"{f['relative_error']:.4f}, output cosine similarity {f['cosine_mean']:.4f} "
          f"(min {f['cosine_min']:.4f})")
    if b:
        print(f"throughput on {b['device']} (batch {b['batch']}, median of {b['runs']} runs): "
              f"original {b['original']:.2f}/s, rewritten {b['rewritten']:.2f}/s, measured "
              f"speed-up {b['speedup']:.2f}x")
    return 0


def bench(args, src: Source, measure, device_of) -> int:
    """``tome-fx bench`` with ``--method tomesd``: eager (and ``--compile``d) throughput of the
    original and the rewritten denoiser on random inputs at ``--batch-size`` (default 2)."""
    import torch
    from tabulate import tabulate

    device, dtype = device_of(args.device), getattr(torch, args.dtype)
    example = inputs(src, args, args.batch_size or 2)
    fast = _optimize(src, example, args)
    moved = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
             if isinstance(v, torch.Tensor) else v for k, v in example.items()}
    original, fast = src.model.to(device=device, dtype=dtype), fast.to(device=device, dtype=dtype)
    modes = [("eager", original, fast)]
    if args.compile:
        modes.append(("compiled", torch.compile(original), torch.compile(fast.graph)))
    results = [{"mode": mode, **measure(a, b, moved, args, label=f"{mode} ")}
               for mode, a, b in modes]
    plan = fast.tome
    print(f"tome-fx bench: {args.source} ({src.model_class}, tomesd) on {device} ({args.dtype}, "
          f"batch {args.batch_size or 2}, median of {args.runs} runs after {args.warmup} warm-up)")
    print(f"levels (downsample: ratio): {', '.join(f'{lv.downsample}: {lv.ratio:.3f}' for lv in plan.levels)}"
          + (f", FLOP ratio {plan.ratio:.4f}" if plan.ratio else ""))
    print(tabulate([[r["mode"], f"{r['original']:.2f}", f"{r['rewritten']:.2f}",
                     f"{r['speedup']:.2f}x"] for r in results],
                   headers=["mode", "original /s", "rewritten /s", "speed-up"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": args.source, "model_class": src.model_class, "method": "tomesd",
                       "device": str(device), "dtype": args.dtype, "flop_ratio": plan.ratio,
                       "levels": {lv.downsample: lv.ratio for lv in plan.levels},
                       "torch": torch.__version__, "results": results}, f, indent=2)
        print(f"wrote {args.json}")
    return 0
