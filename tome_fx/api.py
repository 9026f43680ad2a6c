"""Public entry points: ``optimize`` and ``explain``."""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from . import graph_utils as gu
from .capture import capture, reuse_captures
from .compiling import compile_module, compile_options
from .errors import NoAttentionError
from .match import Matches, find_blocks
from .export_capture import exported_inputs, is_exported_program
from .passes import add_size_bias, check_token_flow, insert_merges, repair_shapes, weight_pooling
from .passes.drop import NO_PREFIX, check_drop, drop_unread
from .passes.follow import follow_side_tensors
from .plans import BlockPlan, Plan, Skipped
from .schedule import parse_r


@dataclass
class Rewrite:
    """What one rewrite produced: the module, the plan and what each pass did."""

    graph_module: fx.GraphModule
    plan: Plan
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    blocks: list = field(default_factory=list)  # matched Blocks; their nodes are graph_module's


def default_inputs(model: nn.Module, batch: int = 2) -> tuple:
    """Example inputs from the model's declared input size (timm cfg or a config's image_size);
    an ExportedProgram's own example inputs."""
    if is_exported_program(model):
        args, kwargs = exported_inputs(model)
        if args and kwargs:
            raise ValueError("the ExportedProgram takes positional and keyword inputs; pass "
                             "example_inputs=")
        return kwargs or args
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size is None:
        config = getattr(model, "config", None)
        image = getattr(config, "image_size", None)
        channels = getattr(config, "num_channels", 3)
        if isinstance(image, int):
            size = (channels, image, image)
        elif isinstance(image, (tuple, list)) and len(image) == 2:
            size = (channels, *image)
        frames = getattr(config, "num_frames", None)  # video: [B, T, C, H, W]
        if size is not None and isinstance(frames, int):
            size = (frames, *size)
        bins, length = getattr(config, "num_mel_bins", None), getattr(config, "max_length", None)
        if size is None and isinstance(bins, int) and isinstance(length, int):
            size = (length, bins)  # audio spectrogram: [B, time, mel bins]
    if size is None:
        raise ValueError(
            f"{type(model).__name__} declares no input size; pass example_inputs=(tensor, ...)"
        )
    img = getattr(model, "patch_embed", None)
    img_size = getattr(img, "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and len(size) == 3:
        size = (size[0], *img_size)
    return (torch.randn(batch, *size),)


def _check_args(model, r, flops_budget):
    if not isinstance(model, nn.Module) and not is_exported_program(model):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if r is not None and flops_budget is not None:
        raise ValueError("pass either r or flops_budget, not both")
    if r is None and flops_budget is None:
        raise ValueError("pass r (tokens merged per block) or flops_budget")
    if flops_budget is not None:
        from .cost import check_budget

        check_budget(flops_budget)  # ValueError/TypeError naming the value


def _block_plan(matches: Matches, sites, shapes, disabled: dict[int, str], frontend: str = "fx",
                notes: tuple = ()) -> Plan:
    merged = {s.block: s for s in sites}
    rows = []
    for b in matches.blocks:
        n_in = shapes[b.stream_in][b.token_dim]
        site = merged.get(b.index)
        n_out = shapes[site.x if site else b.merge_at][b.token_dim]  # fewer: dropped (drop.py)
        r = n_in - n_out if site else 0
        rows.append(BlockPlan(b.index, b.name, b.core.kind, b.norm, n_in, r, n_out,
                              dropped=n_in - r - n_out))
    skipped = [Skipped(r.site, r.reason) for r in matches.refusals]
    skipped += [Skipped(matches.blocks[i].name, why) for i, why in sorted(disabled.items())]
    return Plan(tuple(rows), matches.prefix, tuple(skipped), frontend=frontend, notes=notes)


def _follow(gm, matches: Matches, sites, shapes, cap):
    """Side tensors aligned with the input tokens (padding masks) follow the merges."""
    if not sites:
        return follow_side_tensors(gm, sites, matches.cores, shapes, cap.args, cap.kwargs, 0, 0)
    b0 = matches.blocks[0]
    shape = shapes[b0.merge_at]
    return follow_side_tensors(gm, sites, matches.cores, shapes, cap.args, cap.kwargs,
                               shape[1 - b0.token_dim], shape[b0.token_dim])


def _protect_reads(reads: set, matches: Matches) -> int:
    """Grow the protected prefix over tokens read by position (BERT's pooler reads token 0),
    if together with the prefix they form a leading run; 0 if that does not apply."""
    if not reads or not matches.blocks:
        return 0
    want = max(reads) + 1
    b0 = matches.blocks[0]
    tokens = b0.core.tokens
    if want <= matches.prefix or want > tokens or reads | set(range(matches.prefix)) != set(range(want)):
        return 0
    return want


def _drop_last(gm, matches: Matches, shapes, cap):
    """Drop the tokens the output never reads after the last attention (``passes.drop``):
    (Drop, None) if done and verified, else (None, reason). Updates ``matches`` and ``shapes``."""
    last = matches.blocks[-1]
    done = drop_unread(gm, last, matches.prefix)
    if done.info is None:
        return None, done.notes[0]
    why = check_drop(gm, done.info, matches.prefix, cap.args, cap.kwargs)
    if why:
        return None, why
    drop = done.info
    matches.blocks[-1] = drop.block
    matches.cores = [drop.block.core if c.anchor is last.core.anchor else c for c in matches.cores]
    for old, new in drop.copies.items():  # copies have the ndim of their originals
        if old in shapes:
            shapes[new] = shapes[old]
    return drop, None


def drop_note(dropped, why: str | None, prefix: int) -> str:
    """The plan's note on ``drop_unread``: what was dropped, or why nothing was."""
    if dropped is None:
        return f"unread tokens are not dropped: {why or 'no block to drop them in'}"
    return (f"block {dropped.block.index}: after its attention only the {prefix} protected "
            "token(s) the output reads are computed (the other tokens' query rows, output "
            "projection and MLP are dropped; exact)")


def rewrite(model: nn.Module, schedule_fn, example_inputs=None, prop_attn: bool = True,
            drop: bool = True) -> Rewrite:
    """Capture, match and rewrite. ``schedule_fn(num_blocks) -> list[int]`` gives r per block.

    Merges whose tokens would reach an op that merging makes wrong are switched off, and the
    rewrite repeated, until every consumer of merged tokens is one the merge keeps exact.
    ``drop``: after the last attention, compute only the protected tokens the output reads
    (``passes.drop``; exact, verified, skipped where it does not apply). The last block's merge
    is then pointless and not inserted.
    """
    if example_inputs is None:
        example_inputs = default_inputs(model)
    disabled: dict[int, str] = {}
    protect = 0  # leading tokens the graph reads by position (grown from the token-flow check)
    dropping, dropped, drop_why = drop, None, None
    captured = capture(model, example_inputs)
    while True:  # each round rewrites a fresh copy of the one capture
        cap = dataclasses.replace(captured, graph_module=copy.deepcopy(captured.graph_module))
        gm = cap.graph_module
        shapes, _ = gu.record_shapes(gm, cap.args, cap.kwargs)
        matches = find_blocks(gm, shapes)
        if not matches.cores and not matches.refusals:
            raise NoAttentionError(f"no attention found in {cap.model_class}")
        matches.prefix = max(matches.prefix, protect)
        schedule = schedule_fn(len(matches.blocks))
        enabled = {b.index for b in matches.blocks} - set(disabled)
        if dropping and matches.prefix < 1:
            dropping, drop_why = False, NO_PREFIX
        dropping = dropping and bool(matches.blocks)
        if dropping:
            enabled.discard(matches.blocks[-1].index)
        merged = insert_merges(gm, matches.blocks, schedule, matches.prefix, enabled)
        sites = merged.info
        followed = _follow(gm, matches, sites, shapes, cap)
        fixed = repair_shapes(gm, sites, cap.args, cap.kwargs)  # baked token counts (export)
        if dropping:
            dropped, drop_why = _drop_last(gm, matches, shapes, cap)
            if dropped is None:  # not applicable here: redo the round with the last merge
                dropping = False
                continue
        biased = add_size_bias(gm, matches.cores, sites, shapes) if prop_attn else None
        core_nodes = set().union(*(c.nodes for c in matches.cores))
        r_of = {s.merge: s.merge.args[3] for s in sites}
        flow = check_token_flow(gm, cap.args, cap.kwargs, sites, r_of, matches.prefix, core_nodes,
                                matches.blocks)
        # a mask that cannot follow comes first
        unsafe = followed.info.unsafe or (fixed.info.unsafe + flow.unsafe)
        if not unsafe:
            break
        grow = _protect_reads(flow.reads, matches)
        if grow:
            protect = grow
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        node, reason = min(unsafe, key=lambda nr: order.get(nr[0], 0))
        upstream = [s.block for s in sites if order[s.merge] < order.get(node, len(order))]
        if not upstream:  # cannot happen: unsafe nodes are downstream of some merge
            upstream = [s.block for s in sites]
        for i in upstream:
            disabled[i] = f"merged tokens would reach {node.name}: {reason}"
    pooled = weight_pooling(gm, flow.pools)
    notes = list(cap.notes)
    if drop or dropped is not None:
        notes.append(drop_note(dropped, drop_why, matches.prefix))
    if flow.token_outputs and sites:
        notes.append("the model's output keeps a token dimension; it holds merged tokens")
    plan = _block_plan(matches, sites, flow.shapes, disabled, cap.frontend, tuple(notes))
    counts = {
        "merges": merged.count,
        "size_bias": biased.count if biased else 0,
        "weighted_pool": pooled.count,
        "mask_follow": followed.count,
        "drop_unread": int(dropped is not None),
    }
    if cap.frontend == "export":
        counts["shape_repairs"] = fixed.count
    gm.tome = plan  # the plan travels with the module
    return Rewrite(gm, plan, counts, notes, matches.blocks)


def optimize(
    model: nn.Module,
    *,
    r: Any = None,
    flops_budget: float | None = None,
    example_inputs: Any = None,
    prop_attn: bool = True,
    compile: bool | dict = False,
    strategy: str = "auto",
    method: str = "tome",
    drop_unread: bool = True,
    **tomato: Any,
) -> nn.Module:
    """Return a copy of ``model`` with Token Merging inserted in every attention->MLP block.

    ``r``: int (same every block), list (per block, padded with 0) or ``(r, inflect)``.
    ``strategy``: how ``flops_budget`` is turned into a schedule (see ``tome_fx.plan``).
    The result is a ``torch.fx.GraphModule`` whose ``.tome`` attribute holds the ``Plan``.
    ``compile``: True (or a dict of ``torch.compile`` options) returns it compiled with
    ``torch.compile(fullgraph=True)``; see ``tome_fx.compiling``.
    ``method="tomato"`` merges once instead (``sim_threshold``, ``similarity``, ``block``,
    ``grid``: see ``tome_fx.tomato_api.rewrite_tomato``).
    ``drop_unread``: after the last attention, compute only the protected tokens the output
    reads (a class-token head): exact, verified on the example inputs, skipped where it does not
    apply; the last block then merges nothing (``Plan`` shows the tokens as ``dropped``).
    """
    compile_options(compile)  # TypeError before the (slow) rewrite
    if method == "tomato":
        from .tomato_api import rewrite_tomato

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if r is not None:
            raise ValueError("method='tomato' takes sim_threshold or flops_budget, not r")
        result = rewrite_tomato(model, example_inputs=example_inputs, flops_budget=flops_budget,
                                prop_attn=prop_attn, drop=drop_unread, **tomato)
        return _finish(result, compile, flops_budget)
    if method != "tome":
        raise ValueError(f"method must be 'tome' or 'tomato', got {method!r}")
    if tomato:
        raise TypeError(f"unexpected arguments for method='tome': {', '.join(sorted(tomato))}")
    _check_args(model, r, flops_budget)
    if r is not None:
        parse_r(r, 1 if not isinstance(r, list) else max(len(r), 1))  # type/range errors early
    if flops_budget is not None:  # schedule from the cost model (tome_fx.cost.plan)
        from .cost import rewrite_for_budget

        if example_inputs is None:
            example_inputs = default_inputs(model)
        with reuse_captures():  # the cost model and the final rewrite share one capture
            result = rewrite_for_budget(model, flops_budget, example_inputs, prop_attn, strategy,
                                        drop_unread)
    else:
        result = rewrite(model, lambda n: parse_r(r, n), example_inputs, prop_attn, drop_unread)
    return _finish(result, compile, flops_budget)


def unmet_budget(plan: Plan, budget: float | None) -> str | None:
    """Why the module for ``plan`` does not meet ``budget`` (one line), or None if it does."""
    if budget is None or (plan.ratio is not None and plan.ratio <= budget):
        return None
    got = "the model is unchanged" if plan.ratio is None else f"its FLOP ratio is {plan.ratio:.4f}"
    if plan.skipped:
        first = plan.skipped[0]
        why = (f"{len(plan.skipped)} attention site(s) cannot merge, e.g. {first.site}: "
               f"{first.reason}")
    else:
        why = "no attention->MLP block was found to merge"
    return f"flops_budget={budget:g} is not met ({got}): {why} (every reason: print(module.tome))"


def _finish(result: Rewrite, compile: bool | dict, budget: float | None = None) -> nn.Module:
    why = unmet_budget(result.plan, budget)
    if why:
        warnings.warn(why, UserWarning, stacklevel=3)
    out = result.graph_module
    out.tome_counts = result.counts
    if compile not in (False, None):
        out = compile_module(out, compile)  # .tome and .tome_counts stay reachable
    return out


def explain(model: nn.Module, example_inputs: Any = None, r: Any = 1,
            drop_unread: bool = True) -> Plan:
    """What tome_fx finds in ``model``: blocks, protected tokens, skipped sites with reasons."""
    if example_inputs is None:
        example_inputs = default_inputs(model)
    return rewrite(model, lambda n: parse_r(r, n), example_inputs, drop=drop_unread).plan
