"""The one rewrite: from a capture and a method to a rewritten module and its plan.

Every round works on a fresh copy of the one capture:

1. record shapes, match attention->MLP blocks (``match``);
2. the method inserts its merges in the blocks it may merge (``methods``);
3. shared passes: padding masks follow the merges, baked token counts are repaired, unread
   tokens are dropped after the last attention (checked by running), ``log(size)`` goes into
   every later attention;
4. the token-flow check runs the graph and classifies every consumer of merged tokens.

A consumer that merging would make wrong switches off the merges upstream of it, and the round
is repeated, until the graph is one the merges keep exact; a read of leading tokens by position
grows the protected prefix instead. Refusals become the plan's ``skipped`` reasons.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from . import graph as gu
from .capture import Captured
from .checks.drop import check_drop
from .checks.token_flow import check_token_flow
from .errors import NoAttentionError, RewriteError
from .match import Matches, find_blocks
from .passes.base import Context
from .passes.drop import NO_PREFIX, Drop, drop_unread
from .passes.follow import follow_side_tensors
from .passes.pooling import weight_pooling
from .passes.shapes import repair_shapes
from .passes.size_bias import add_size_bias, prop_attn_form
from .passes.unmerge import insert_unmerges, new_edges
from .plans import BlockPlan, Plan, Skipped


@dataclass
class Rewrite:
    """What one rewrite produced: the module, the plan and what each pass did."""

    graph_module: fx.GraphModule
    plan: Plan
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    blocks: list = field(default_factory=list)  # matched Blocks; their nodes are graph_module's
    disabled: dict = field(default_factory=dict)  # block -> why its merge is switched off
    drop_why: str | None = None  # why unread tokens are not dropped (when asked to)


def analyse(captured: Captured) -> Context:
    """A fresh copy of the captured graph with its shapes and matched blocks."""
    gm = captured.copy().graph_module
    shapes, _ = gu.record_shapes(gm, captured.args, captured.kwargs)
    matches = find_blocks(gm, shapes)
    if not matches.cores and not matches.refusals:
        raise NoAttentionError(f"no attention found in {captured.model_class}")
    return Context(gm, captured.args, captured.kwargs, shapes, matches)


def block_plan(matches: Matches, sites, shapes, disabled: dict[int, str], frontend: str,
               notes: tuple) -> Plan:
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


def _upstream(sites, node: fx.Node, order: dict) -> list[int]:
    """The blocks whose merged tokens reach ``node`` (another tower's merges do not), else
    those whose merge comes before it."""
    reach = [s.block for s in sites if node in gu.descendants([s.merge])]
    return reach or [s.block for s in sites if order[s.merge] < order.get(node, len(order))]


def protect_reads(reads: set, matches: Matches) -> int:
    """Grow the protected prefix over tokens read by position (BERT's pooler reads token 0),
    if together with the prefix they form a leading run; 0 if that does not apply."""
    if not reads or not matches.blocks:
        return 0
    want = max(reads) + 1
    tokens = matches.blocks[0].core.tokens
    if want <= matches.prefix or want > tokens or reads | set(range(matches.prefix)) != set(range(want)):
        return 0
    return want


def drop_last(ctx: Context) -> tuple[Drop | None, str | None]:
    """Drop the tokens the output never reads after the last attention (``passes.drop``):
    (Drop, None) if done and verified, else (None, reason). Updates ``ctx``'s matches and
    shapes to the rewired last block."""
    matches, last = ctx.matches, ctx.matches.blocks[-1]
    done = drop_unread(ctx)
    if done.info is None:
        return None, done.notes[0]
    why = check_drop(ctx, done.info)
    if why:
        return None, why
    drop = done.info
    matches.blocks[-1] = drop.block
    matches.cores = [drop.block.core if c.anchor is last.core.anchor else c for c in matches.cores]
    for old, new in drop.copies.items():  # copies have the ndim of their originals
        if old in ctx.shapes:
            ctx.shapes[new] = ctx.shapes[old]
    return drop, None


def _drop_blocker(matches: Matches) -> str | None:
    """Why no method can drop unread tokens in this graph, else None."""
    if matches.prefix < 1:
        return NO_PREFIX
    return None if matches.blocks else "no block to drop them in"


def drop_note(dropped, why: str | None, prefix: int) -> str:
    """The plan's note on ``drop_unread``: what was dropped, or why nothing was."""
    if dropped is None:
        return f"unread tokens are not dropped: {why or 'no block to drop them in'}"
    return (f"block {dropped.block.index}: after its attention only the {prefix} protected "
            "token(s) the output reads are computed (the other tokens' query rows, output "
            "projection and MLP are dropped; exact)")


def rewrite(captured: Captured, method, *, prop_attn=True, drop: bool = True) -> Rewrite:
    """Rewrite a copy of ``captured`` with ``method``'s merges (see the module docstring).

    ``prop_attn``: True, False, ``"bias"`` or ``"fold"`` (``passes.size_bias``).
    ``drop``: after the last attention, compute only the protected tokens the output reads
    (``passes.drop``; exact, verified, skipped with the reason where it does not apply).
    """
    form = prop_attn_form(prop_attn)
    disabled: dict[int, str] = {}
    protect = 0  # leading tokens the graph reads by position (grown from the token-flow check)
    dropping, dropped, drop_why = drop, None, None
    edges: dict = {}  # where merged tokens go back to the original layout (passes.unmerge)
    while True:
        ctx, dropped = analyse(captured), None
        matches = ctx.matches
        matches.prefix = max(matches.prefix, protect)
        disabled.update(method.prepare(ctx))
        if dropping:
            drop_why = _drop_blocker(matches) or method.drop_blocker(ctx, disabled)
            dropping = drop_why is None
        ctx.sites = method.insert(ctx, method.enabled(ctx, disabled, dropping))
        followed = follow_side_tensors(ctx)
        unmerged = insert_unmerges(ctx, edges.values())
        fixed = repair_shapes(ctx)  # baked token counts (export)
        if dropping:
            dropped, drop_why = drop_last(ctx)
            if dropped is None:  # not applicable here: redo the round without it
                dropping = False
                continue
        biased = add_size_bias(ctx, form) if form else None
        flow = check_token_flow(ctx)
        found = new_edges(ctx, getattr(method, "unmerge", False), flow, edges)
        if found:  # unmerge there, instead of switching merges off
            edges.update(found)
            continue
        # a mask that cannot follow comes first
        unsafe = followed.info.unsafe or (fixed.info.unsafe + flow.unsafe)
        if not unsafe:
            break
        grow = protect_reads(flow.reads, matches)
        if grow:
            protect = grow
            continue
        order = {n: i for i, n in enumerate(ctx.gm.graph.nodes)}
        node, reason = min(unsafe, key=lambda nr: order.get(nr[0], 0))
        blame = getattr(method, "blame", None)  # local merges: the sites around the node
        upstream = blame(ctx, node) if blame else []
        upstream = upstream or followed.info.blame.get(node) or _upstream(ctx.sites, node, order)
        fresh = [i for i in upstream or [s.block for s in ctx.sites] if i not in disabled]
        if not fresh:  # nothing left to switch off: stop, never loop
            raise RewriteError(f"{node.name} is unsafe ({reason}) and no merge is left to switch "
                               "off (the method's rule should refuse that site)")
        for i in fresh:  # unsafe nodes follow some merge
            disabled[i] = f"merged tokens would reach {node.name}: {reason}"
    gm, sites = ctx.gm, ctx.sites
    pooled = weight_pooling(ctx, flow.pools)
    notes = list(captured.notes) + list(method.notes)
    if drop or dropped is not None:
        notes.append(drop_note(dropped, drop_why, matches.prefix))
    if flow.token_outputs and sites:
        notes.append("the model's output keeps a token dimension; it holds merged tokens")
    notes += [f"unmerged to the original token layout before {e.consumer} ({e.why})"
              for e in unmerged.info]
    if matches.cross and sites:
        how = "its keys get log(size)" if biased is not None else "proportional attention is off"
        notes.append(f"cross-attention over the tokens (attention pooling) at "
                     f"{', '.join(matches.cross)}: no block to merge in; {how}")
    if biased is not None and biased.info:
        notes.append(f"proportional attention folded into queries and keys (no attn_mask) in "
                     f"{biased.info} of {biased.count} attention(s)")
    plan = block_plan(matches, sites, flow.shapes, disabled, captured.frontend, tuple(notes))
    plan = method.describe(plan, ctx)
    counts = {
        "merges": len(sites),
        "size_bias": biased.count if biased else 0,
        "weighted_pool": pooled.count,
        "mask_follow": followed.count,
        "drop_unread": int(dropped is not None),
        "unmerge": unmerged.count,
    }
    if captured.frontend == "export":
        counts["shape_repairs"] = fixed.count
    gm.tome = plan  # the plan travels with the module
    return Rewrite(gm, plan, counts, notes, matches.blocks, disabled,
                   drop_why if drop and dropped is None else None)
