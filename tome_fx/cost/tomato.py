"""ToMato under a FLOP budget: the token count after the merge that meets it, and the rewrite.

FLOPs come from the ToMe cost model's closed form (``cost.model``): its per-segment terms
``c + a*T + q*T^2`` evaluated with ``N`` tokens up to the merge block's merge point and ``N'``
after, plus the ToMato op's own product (``kernels.tomato.tomato_flops``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..capture import Captured, capture
from ..kernels.tomato import tomato_flops
from ..rules.tomato import LAST_BLOCK, UNCHANGED, ToMato, check_args, sim_source
from ..passes.drop import NO_PREFIX
from ..pipeline import Rewrite, analyse, rewrite
from .model import CostModel
from .search import check_budget


GROUPS_NOTE = ("padding groups: patches of different groups never join, so an image whose groups "
               "cannot get down to the token count keeps more tokens (the batch is padded with "
               "size-0 tokens) and costs more than the plan's FLOPs")


@dataclass(frozen=True)
class Site:
    """What pricing a ToMato merge needs to know about its block."""

    block: int
    tokens: int  # tokens at the merge point (protected included)
    prefix: int
    batch: int
    heads: int
    head_dim: int
    kind: str  # similarity source (kernels.tomato.edge_similarity)
    reason: str | None  # why the merge cannot be placed (no patch grid), else None
    drop_skipped: str | None  # why unread tokens cannot be dropped after it, else None

    def extra_flops(self) -> int:
        return tomato_flops(self.kind, self.batch, self.heads, self.tokens, self.prefix,
                            self.head_dim)


def site_of(captured: Captured, method: ToMato) -> Site:
    ctx = analyse(captured)
    grid = method.patch_grid(ctx)  # ValueError for a block or grid that does not fit
    block, prefix = method.target(ctx), ctx.matches.prefix
    shape, q = ctx.shapes[block.merge_at], ctx.shapes[block.core.query]
    skipped = NO_PREFIX if prefix < 1 else LAST_BLOCK if block is ctx.matches.blocks[-1] else None
    return Site(block.index, shape[block.token_dim], prefix, shape[1 - block.token_dim],
                q[1] if len(q) == 4 else 1, q[-1], sim_source(block, method.similarity)[1],
                grid if isinstance(grid, str) else None, skipped)


def curve(cm: CostModel, site: Site):
    """FLOPs (for the example batch) as a function of the tokens after the merge."""
    j, n0 = site.block, cm.tokens
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
    check_args(0.0, None, similarity, block, grid)
    captured = capture(model, example_inputs)
    site = site_of(captured, ToMato(block, grid, similarity))
    if site.reason is not None:
        raise ValueError(f"ToMato cannot merge this model: {site.reason}")
    cm = CostModel.build(captured, prop_attn, drop=drop and not site.drop_skipped, unmerge=False)
    return curve(cm, site), cm.flops_original


def tokens_for_budget(cm: CostModel, site: Site, flops_budget: float) -> tuple[int, int]:
    """(patch tokens removed r, FLOPs): the fewest merges meeting the budget."""
    b, flops = check_budget(flops_budget), curve(cm, site)
    n0, orig = cm.tokens, cm.flops_original
    for n_after in range(n0, cm.prefix, -1):
        if flops(n_after) <= b * orig:
            return n0 - n_after, flops(n_after)
    least = flops(cm.prefix + 1) / orig
    raise ValueError(f"flops_budget={flops_budget} is below the smallest reachable FLOP ratio "
                     f"{least:.4f} for ToMato at block {site.block} (one token per image "
                     f"left); pass flops_budget >= {math.ceil(least * 1e4) / 1e4}")


def rewrite_tomato(captured: Captured, method: ToMato, flops_budget: float | None = None,
                   prop_attn: bool | str = True, drop: bool = True) -> Rewrite:
    """The ToMato rewrite; with ``flops_budget``, count mode at the fewest merges meeting it.

    Its FLOPs are priced with the unread tokens dropped where that applies; where the rewrite
    then cannot drop them, it is priced and rewritten again without, and the notes say why.
    """
    result, why = _attempt(captured, method, flops_budget, prop_attn, drop)
    if result is None:
        result, _ = _attempt(captured, method, flops_budget, prop_attn, False)
        note = f"unread tokens are not dropped: {why}"
        result.notes.append(note)
        result.plan = dataclasses.replace(result.plan, notes=result.plan.notes + (note,))
        result.graph_module.tome = result.plan
    return result


def _attempt(captured, method: ToMato, flops_budget, prop_attn, drop):
    """(Rewrite, None), or (None, why) where the unread tokens were priced as dropped but the
    rewrite does not drop them."""
    site = site_of(captured, method)
    dropping = drop and site.reason is None and site.drop_skipped is None
    flops = orig = None
    if site.reason is None and flops_budget is not None:
        cm = CostModel.build(captured, prop_attn, drop=dropping, unmerge=False)
        if dropping and cm.original is None:
            return None, "the cost model's rewrite could not drop them"
        r, flops = tokens_for_budget(cm, site, flops_budget)
        method, orig = dataclasses.replace(method, r=r), cm.flops_original
    rw = rewrite(captured, method, prop_attn=prop_attn, drop=drop)
    if dropping and rw.drop_why not in (None, UNCHANGED):
        return None, rw.drop_why
    merged = rw.counts["merges"] or (method.r == 0 and method.block not in rw.disabled)
    notes = rw.plan.notes
    if rw.counts["merges"] and rw.counts["mask_follow"] and method.r:
        notes += (GROUPS_NOTE,)
        rw.notes.append(GROUPS_NOTE)
    rw.plan = dataclasses.replace(rw.plan, budget=flops_budget, flops=flops if merged else None,
                                  flops_original=orig, notes=notes)
    rw.graph_module.tome = rw.plan
    return rw, None
