"""Public entry points: ``optimize`` and ``explain``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from . import graph_utils as gu
from .capture import capture
from .errors import NoAttentionError
from .match import Matches, find_blocks
from .passes import add_size_bias, check_token_flow, insert_merges, weight_pooling
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
    """Example inputs from the model's declared input size (timm cfg or a config's image_size)."""
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if r is not None and flops_budget is not None:
        raise ValueError("pass either r or flops_budget, not both")
    if r is None and flops_budget is None:
        raise ValueError("pass r (tokens merged per block) or flops_budget")
    if flops_budget is not None:
        from .cost import check_budget

        check_budget(flops_budget)  # ValueError/TypeError naming the value


def _block_plan(matches: Matches, sites, shapes, disabled: dict[int, str]) -> Plan:
    merged = {s.block: s for s in sites}
    rows = []
    for b in matches.blocks:
        n_in = shapes[b.merge_at][b.token_dim]
        site = merged.get(b.index)
        n_out = shapes[site.x][b.token_dim] if site else n_in
        rows.append(BlockPlan(b.index, b.name, b.core.kind, b.norm, n_in, n_in - n_out, n_out))
    skipped = [Skipped(r.site, r.reason) for r in matches.refusals]
    skipped += [Skipped(matches.blocks[i].name, why) for i, why in sorted(disabled.items())]
    return Plan(tuple(rows), matches.prefix, tuple(skipped))


def rewrite(model: nn.Module, schedule_fn, example_inputs=None, prop_attn: bool = True) -> Rewrite:
    """Capture, match and rewrite. ``schedule_fn(num_blocks) -> list[int]`` gives r per block.

    Merges whose tokens would reach an op that merging makes wrong are switched off, and the
    rewrite repeated, until every consumer of merged tokens is one the merge keeps exact.
    """
    if example_inputs is None:
        example_inputs = default_inputs(model)
    disabled: dict[int, str] = {}
    while True:
        cap = capture(model, example_inputs)
        gm = cap.graph_module
        shapes, _ = gu.record_shapes(gm, cap.args, cap.kwargs)
        matches = find_blocks(gm, shapes)
        if not matches.cores and not matches.refusals:
            raise NoAttentionError(f"no attention found in {cap.model_class}")
        schedule = schedule_fn(len(matches.blocks))
        enabled = {b.index for b in matches.blocks} - set(disabled)
        merged = insert_merges(gm, matches.blocks, schedule, matches.prefix, enabled)
        sites = merged.info
        biased = add_size_bias(gm, matches.cores, sites, shapes) if prop_attn else None
        core_nodes = set().union(*(c.nodes for c in matches.cores))
        r_of = {s.merge: s.merge.args[3] for s in sites}
        flow = check_token_flow(gm, cap.args, cap.kwargs, sites, r_of, matches.prefix, core_nodes)
        if not flow.unsafe:
            break
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        node, reason = min(flow.unsafe, key=lambda nr: order.get(nr[0], 0))
        upstream = [s.block for s in sites if order[s.merge] < order.get(node, len(order))]
        if not upstream:  # cannot happen: unsafe nodes are downstream of some merge
            upstream = [s.block for s in sites]
        for i in upstream:
            disabled[i] = f"merged tokens would reach {node.name}: {reason}"
    pooled = weight_pooling(gm, flow.pools)
    plan = _block_plan(matches, sites, flow.shapes, disabled)
    notes = list(cap.notes)
    if flow.token_outputs and sites:
        notes.append("the model's output keeps a token dimension; it holds merged tokens")
    counts = {
        "merges": merged.count,
        "size_bias": biased.count if biased else 0,
        "weighted_pool": pooled.count,
    }
    gm.tome = plan  # the plan travels with the module
    return Rewrite(gm, plan, counts, notes, matches.blocks)


def optimize(
    model: nn.Module,
    *,
    r: Any = None,
    flops_budget: float | None = None,
    example_inputs: Any = None,
    prop_attn: bool = True,
    compile: bool = False,
    strategy: str = "auto",
) -> nn.Module:
    """Return a copy of ``model`` with Token Merging inserted in every attention->MLP block.

    ``r``: int (same every block), list (per block, padded with 0) or ``(r, inflect)``.
    ``strategy``: how ``flops_budget`` is turned into a schedule (see ``tome_fx.plan``).
    The result is a ``torch.fx.GraphModule`` whose ``.tome`` attribute holds the ``Plan``.
    """
    _check_args(model, r, flops_budget)
    if r is not None:
        parse_r(r, 1 if not isinstance(r, list) else max(len(r), 1))  # type/range errors early
    if flops_budget is not None:  # schedule from the cost model (tome_fx.cost.plan)
        from .cost import rewrite_for_budget

        result = rewrite_for_budget(model, flops_budget, example_inputs, prop_attn, strategy)
    else:
        result = rewrite(model, lambda n: parse_r(r, n), example_inputs, prop_attn)
    out = result.graph_module
    out.tome_counts = result.counts
    if compile:
        out = torch.compile(out)
    return out


def explain(model: nn.Module, example_inputs: Any = None, r: Any = 1) -> Plan:
    """What tome_fx finds in ``model``: blocks, protected tokens, skipped sites with reasons."""
    if example_inputs is None:
        example_inputs = default_inputs(model)
    return rewrite(model, lambda n: parse_r(r, n), example_inputs).plan
