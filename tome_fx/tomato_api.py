"""``optimize(model, method="tomato", ...)``: capture, one ToMato merge, proportional attention.

The merge goes at the chosen block's merge point (after its attention residual, before its MLP),
the same place ToMe merges. Later attention gets ``log(size)`` as key bias (padding tokens of
size 0 get ``-inf``), token means become size-weighted, and the token-flow check must accept
every consumer of the merged tokens, else the model is returned unchanged with the reason.
"""
from __future__ import annotations

import dataclasses
import math

import torch.nn as nn

from . import graph_utils as gu
from .capture import capture
from .api import drop_note
from .errors import NoAttentionError
from .match import find_blocks
from .passes import add_size_bias, check_token_flow, repair_shapes, weight_pooling
from .passes.drop import NO_PREFIX
from .passes.tomato import find_grid, insert_tomato, sim_source
from .tomato import SIMILARITIES, tomato_flops


def _check(sim_threshold, flops_budget, similarity, block, grid):
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if sim_threshold is None and flops_budget is None:
        raise ValueError("method='tomato' needs sim_threshold=... or flops_budget=...")
    if sim_threshold is not None and flops_budget is not None:
        raise ValueError("pass either sim_threshold or flops_budget, not both")
    if sim_threshold is not None and (isinstance(sim_threshold, bool) or
                                      not isinstance(sim_threshold, (int, float))
                                      or math.isnan(sim_threshold)):
        raise TypeError(f"sim_threshold must be a number, got {sim_threshold!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ValueError(f"block must be an int >= 0, got {block!r}")
    if grid is not None and (len(grid) != 2 or any(not isinstance(g, int) or g < 1 for g in grid)):
        raise ValueError(f"grid must be (h, w) with positive ints, got {grid!r}")


class _Site:
    """Capture and match once; what a ToMato rewrite of one block needs."""

    def __init__(self, model, example_inputs, block, grid, similarity):
        self.cap = capture(model, example_inputs)
        self.gm = self.cap.graph_module
        self.shapes, _ = gu.record_shapes(self.gm, self.cap.args, self.cap.kwargs)
        self.matches = find_blocks(self.gm, self.shapes)
        m = self.matches
        if not m.cores and not m.refusals:
            raise NoAttentionError(f"no attention found in {self.cap.model_class}")
        self.reason = None
        if block >= len(m.blocks):
            raise ValueError(f"block={block} but {self.cap.model_class} has {len(m.blocks)} "
                             "rewritable blocks")
        self.block = m.blocks[block]
        self.tokens = self.shapes[self.block.merge_at][self.block.token_dim]
        if grid is None:
            found = find_grid(self.gm, self.block, self.shapes, m.prefix)
            if isinstance(found, str):
                self.reason, found = found, None
            grid = found
        elif grid[0] * grid[1] != self.tokens - m.prefix:
            raise ValueError(f"grid={tuple(grid)} has {grid[0] * grid[1]} patches but block "
                             f"{block} has {self.tokens} tokens with {m.prefix} protected")
        self.grid = None if grid is None else tuple(grid)
        src, self.kind, _ = sim_source(self.block, similarity)
        q = self.shapes[self.block.core.query]
        self.heads = q[1] if len(q) == 4 else 1
        self.head_dim = q[-1]
        self.batch = self.shapes[self.block.merge_at][1 - self.block.token_dim]

    def drop_skipped(self) -> str | None:
        """Why ``passes.drop`` is not tried after this merge, or None: it needs a protected
        token to keep and a block after the merge block (whose MLP reads all its tokens)."""
        if self.matches.prefix < 1:
            return NO_PREFIX
        if self.block is self.matches.blocks[-1]:
            return "the merge is in the last block, whose MLP reads every merged token"
        return None

    def extra_flops(self) -> int:
        return tomato_flops(self.kind, self.batch, self.heads, self.tokens,
                            self.matches.prefix, self.head_dim)


def _flops_curve(cm, site: _Site):
    """FLOPs (for the example batch) as a function of the tokens after the merge.

    The ToMe cost model's closed form (``tome_fx.cost``): its per-segment terms
    ``c + a*T + q*T^2`` evaluated with ``N`` tokens up to the chosen block's merge point and
    ``N'`` after, plus the ToMato op's own product (``tomato_flops``).
    """
    j = site.block.index
    n0 = cm.tokens
    measured = cm.token_counts(cm.max_schedule())
    if any(measured[s] == n0 for s in range(j + 1, cm.num_blocks + 1)):
        raise ValueError(f"cannot model FLOPs after block {j}: ToMe merging is switched off "
                         "there (see tome_fx.explain)")

    def flops(n_after: int) -> int:
        t = [n0] * (j + 1) + [n_after] * (cm.num_blocks - j)
        total = sum(term.at(t[seg]) for (seg, _), term in cm.terms.items())
        return int(round(total)) + (site.extra_flops() if n_after < n0 else 0)

    return flops


def flops_curve(model, example_inputs=None, *, similarity="attention", block=0, grid=None,
                prop_attn=True, drop=True):
    """``(flops(n_after), flops_original)`` of ToMato for the example inputs' batch.

    ``n_after`` counts all tokens after the merge (protected ones included). In threshold mode
    each image has its own count: its FLOPs are ``flops(n_i) / batch``. ``drop``: as
    ``optimize(drop_unread=)``; assumes the drop applies where ToMe's cost model found it does.
    """
    from .api import default_inputs
    from .cost import CostModel

    _check(0.0, None, similarity, block, grid)
    if example_inputs is None:
        example_inputs = default_inputs(model)
    site = _Site(model, example_inputs, block, grid, similarity)
    if site.reason is not None:
        raise ValueError(f"ToMato cannot merge this model: {site.reason}")
    cm = CostModel.build(model, example_inputs, prop_attn, drop=drop and not site.drop_skipped())
    return _flops_curve(cm, site), cm.flops_original


def tokens_for_budget(model, flops_budget, example_inputs, site: _Site, prop_attn=True,
                      drop=True):
    """(patch tokens removed r, FLOPs, original FLOPs, dropped): the fewest merges meeting the
    budget; ``dropped``: whether the cost model's rewrite dropped the unread tokens (its FLOPs
    hold only for a rewrite that does the same)."""
    from .cost import CostModel, check_budget

    b = check_budget(flops_budget)
    cm = CostModel.build(model, example_inputs, prop_attn, drop=drop)
    flops = _flops_curve(cm, site)
    n0, orig = cm.tokens, cm.flops_original
    for n_after in range(n0, cm.prefix, -1):
        if flops(n_after) <= b * orig:
            return n0 - n_after, flops(n_after), orig, cm.original is not None
    least = flops(cm.prefix + 1) / orig
    raise ValueError(f"flops_budget={flops_budget} is below the smallest reachable FLOP ratio "
                     f"{least:.4f} for ToMato at block {site.block.index} (one token per image "
                     f"left); pass flops_budget >= {math.ceil(least * 1e4) / 1e4}")


def rewrite_tomato(model: nn.Module, *, example_inputs=None, sim_threshold=None,
                   flops_budget=None, similarity: str = "attention", block: int = 0,
                   grid=None, prop_attn: bool = True, drop: bool = True):
    """The ToMato rewrite; returns ``tome_fx.api.Rewrite`` (module, plan, counts, notes).

    ``drop``: after the last attention compute only the protected tokens the output reads, as
    ``optimize(drop_unread=)`` does for ToMe; where that fails its check the rewrite is redone
    without it and the plan's notes say why.
    """
    _check(sim_threshold, flops_budget, similarity, block, grid)
    if sim_threshold is not None and not prop_attn:
        raise ValueError("ToMato threshold mode needs prop_attn=True: its log(size) bias is what "
                         "keeps padding tokens (size 0) out of attention")
    if example_inputs is None:
        from .api import default_inputs

        example_inputs = default_inputs(model)
    args = (model, example_inputs, sim_threshold, flops_budget, similarity, block, grid, prop_attn)
    result, why = _rewrite(*args, drop)
    if result is None:  # the drop failed its check: the same rewrite without it
        result, _ = _rewrite(*args, False, why)
    return result


def _rewrite(model, example_inputs, sim_threshold, flops_budget, similarity, block, grid,
             prop_attn, drop, skip_drop=None):
    """(Rewrite, None), or (None, why) if ``drop`` applies here but fails its check.
    ``skip_drop``: why an earlier try did not drop (for the notes)."""
    from .api import Rewrite, _block_plan, _drop_last

    site = _Site(model, example_inputs, block, grid, similarity)
    skip_drop = site.drop_skipped() if drop else skip_drop
    dropping = drop and site.reason is None and skip_drop is None
    r, flops, orig = None, None, None
    if site.reason is None and flops_budget is not None:
        r, flops, orig, priced = tokens_for_budget(model, flops_budget, example_inputs, site,
                                                   prop_attn, dropping)
        if dropping and not priced:
            return None, "the cost model's rewrite could not drop them"
    m, gm = site.matches, site.gm
    sites, disabled, dropped = [], {}, None
    counts = {"merges": 0, "size_bias": 0, "weighted_pool": 0, "drop_unread": 0}
    flow_shapes = site.shapes
    if site.reason is not None:
        disabled[site.block.index] = site.reason
    elif r != 0:
        sites = insert_tomato(gm, site.block, m.prefix, site.grid, similarity, sim_threshold,
                              r).info
    fixed = repair_shapes(gm, sites, site.cap.args, site.cap.kwargs)  # baked counts (export)
    if site.cap.frontend == "export":
        counts["shape_repairs"] = fixed.count
    if dropping:
        dropped, why = _drop_last(gm, m, site.shapes, site.cap)
        if dropped is None:
            return None, why
    if sites:
        biased = add_size_bias(gm, m.cores, sites, site.shapes) if prop_attn else None
        core_nodes = set().union(*(c.nodes for c in m.cores))
        flow = check_token_flow(gm, site.cap.args, site.cap.kwargs, sites,
                                {s.merge: r for s in sites}, m.prefix, core_nodes)
        unsafe = fixed.info.unsafe or flow.unsafe
        if unsafe:  # the model is returned unchanged, with the reason
            node, why = unsafe[0]
            disabled[site.block.index] = f"merged tokens would reach {node.name}: {why}"
            site = _Site(model, example_inputs, block, grid, similarity)  # a clean graph
            m, gm, sites, dropped, flow_shapes = site.matches, site.gm, [], None, site.shapes
            counts["shape_repairs"] = 0
            skip_drop = "the model is left unchanged" if drop else skip_drop
        else:
            flow_shapes = flow.shapes
            counts.update(merges=1, size_bias=biased.count if biased else 0,
                          weighted_pool=weight_pooling(gm, flow.pools).count)
    elif dropped is not None:  # the plan reads the kept token counts from a run
        flow_shapes, _ = gu.record_shapes(gm, site.cap.args, site.cap.kwargs)
    counts["drop_unread"] = int(dropped is not None)
    notes = list(site.cap.notes)
    if sim_threshold is not None:
        notes.append("threshold mode: token counts after the merge depend on the image; a batch "
                     "is padded to its largest count with size-0 tokens")
    if dropped is not None or skip_drop is not None:
        notes.append(drop_note(dropped, skip_drop, m.prefix))
    plan = _block_plan(m, sites, flow_shapes, disabled, site.cap.frontend, tuple(notes))
    plan = dataclasses.replace(plan, method="tomato", merge_block=block, similarity=similarity,
                               sim_threshold=sim_threshold, grid=site.grid, budget=flops_budget,
                               flops=flops if sites or (r == 0 and not disabled) else None,
                               flops_original=orig)
    gm.tome = plan
    return Rewrite(gm, plan, counts, notes, m.blocks), None
