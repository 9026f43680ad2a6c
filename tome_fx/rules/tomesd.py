"""ToMeSD: local merging around the ops of every transformer block on a 2-D token grid
(kernel: ``kernels.tomesd``; where: ``rules.local``).

Per transformer block one match is computed on the block's input tokens; each chosen op (the
self-attention, and with ``merge_crossattn``/``merge_mlp`` the cross-attention and the MLP) runs
on the merged tokens of its normalised input, and its output is unmerged to the full grid before
the residual add. Nothing outside the ops sees merged tokens, so no size bias, pooling or
unmerge at the outputs is needed.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import graph as gu
from ..kernels.tomesd import grid_rows, tomesd_match, tomesd_merge, tomesd_unmerge
from ..passes.base import Context, inserted
from ..passes.merge import MergeSite
from ..plans import Plan
from .joint import follow_joint_split, follow_tables, position_tables, rope_reason
from .local import NO_GRID, OPS, VIDEO, LocalBlock, find_local, step_input

NO_SITES = "a transformer block over a 2-D token grid"


def check_ratio(ratio, name: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio):
        raise TypeError(f"{name} must be a number in [0, 1), got {ratio!r}")
    if not 0 <= ratio < 1:
        raise ValueError(f"{name} must be in [0, 1), got {ratio!r}")
    return float(ratio)


def check_args(ratio, max_downsample, sx, sy, use_rand, seed, flags) -> None:
    """One-line errors for ``optimize(method="tomesd", ...)``'s arguments."""
    if isinstance(ratio, dict):
        for level, value in ratio.items():
            if isinstance(level, bool) or not isinstance(level, int) or level < 1:
                raise ValueError(f"ratio keys are downsample levels (ints >= 1), got {level!r}")
            check_ratio(value, f"ratio[{level}]")
    elif ratio is not None:
        check_ratio(ratio)
    if max_downsample is not None and (isinstance(max_downsample, bool) or
                                       not isinstance(max_downsample, int) or max_downsample < 1):
        raise ValueError(f"max_downsample must be an int >= 1, got {max_downsample!r}")
    for name, v in (("sx", sx), ("sy", sy)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if sx * sy < 2:
        raise ValueError("sx * sy must be at least 2: a 1x1 window has no token to merge")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    for name, v in (("use_rand", use_rand), *flags.items()):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be True or False, got {v!r}")
    if not any(flags.values()):
        raise ValueError("merge_attn, merge_crossattn and merge_mlp are all False: nothing "
                         "would merge")


@dataclass(frozen=True)
class ToMeSD:
    """Local merging. ``ratio``: one ratio for every level up to ``max_downsample`` (None: the
    finest level that has a transformer block), or a dict downsample level -> ratio."""

    ratio: float | dict = 0.5
    max_downsample: int | None = None
    ops: tuple = ("attn",)  # which ops merge (OPS)
    sx: int = 2
    sy: int = 2
    use_rand: bool = False
    seed: int = 0
    notes: tuple = ()
    unmerge: bool = False  # nothing leaves an op merged

    def sites(self, ctx: Context) -> list[LocalBlock]:
        return [b for b in ctx.matches.blocks if isinstance(b, LocalBlock)]

    def prepare(self, ctx: Context) -> dict[int, str]:
        """Replaces the matched ToMe blocks with the local sites (one per op of every
        transformer block on a grid); refuses windows that do not fit the grid."""
        m = ctx.matches
        blocks, refusals = find_local(ctx.gm, ctx.shapes, m.cores, (ctx.args, ctx.kwargs))
        if not blocks:
            reasons = sorted({r.reason for r in refusals}, key=lambda r: (r == NO_GRID, r))
            why = "; ".join(reasons) or "no attention"
            raise ValueError(f"method='tomesd' needs {NO_SITES}: {why}")
        m.blocks, m.refusals, m.cross = blocks, refusals, []
        refused = {}
        for b in blocks:
            h, w = b.hw
            tables = position_tables(b, ctx.shapes) if b.op != "mlp" else []
            if b.frames > 1:
                refused[b.index] = VIDEO
            elif tables and b.ids is None:  # a grid the kernels cannot give positions
                refused[b.index] = rope_reason(tables)
            elif h < self.sy or w < self.sx:
                refused[b.index] = (f"the {h}x{w} grid is smaller than one {self.sy}x{self.sx} "
                                    "window (sy x sx)")
        return refused

    def levels(self, sites: list[LocalBlock]) -> dict[int, float]:
        """Downsample level -> ratio, for the levels ``sites`` have."""
        have = sorted({b.downsample for b in sites})
        if isinstance(self.ratio, dict):
            return {ds: float(self.ratio.get(ds, 0.0)) for ds in have}
        top = self.max_downsample or (have[0] if have else 1)
        return {ds: float(self.ratio) if ds <= top else 0.0 for ds in have}

    def site_ratio(self, block: LocalBlock, levels: dict) -> float:
        return levels.get(block.downsample, 0.0) if block.op in self.ops else 0.0

    def enabled(self, ctx: Context, disabled: dict, dropping: bool) -> set[int]:
        sites = self.sites(ctx)
        levels = self.levels(sites)
        return {b.index for b in sites
                if b.index not in disabled and self.site_ratio(b, levels) > 0}

    def drop_blocker(self, ctx: Context, disabled: dict) -> str | None:
        return "ToMeSD unmerges every op's output: every token is computed"

    def insert(self, ctx: Context, enabled: set[int]) -> list[MergeSite]:
        graph, made, sites = ctx.gm.graph, {}, []
        step = step_input(ctx.gm, ctx.shapes) if self.use_rand else None
        levels = self.levels(self.sites(ctx))
        for b in self.sites(ctx):
            if b.index not in enabled:
                continue
            match = made.get(b.group)
            if match is None:
                patch = ctx.shapes[b.grid][-1] // b.hw[1] if b.grid is not None else 1
                match = made[b.group] = self._match(graph, b, levels[b.downsample], step, patch)
            if b.op == "crossattn":  # merged queries are unmerged after it (token flow check)
                b.core.anchor.meta.setdefault("tome", {})["local"] = True
            inside = set(gu.between(b.merge_at, b.op_out))  # the op's own nodes
            with graph.inserting_after(b.merge_at):
                x = inserted(graph.call_function(tomesd_merge, (b.merge_at, match)),
                             "local_merge", site=b.index)
            for u in list(b.merge_at.users):
                if u in inside:
                    u.replace_input_with(b.merge_at, x)
            with graph.inserting_after(b.op_out):
                back = inserted(graph.call_function(tomesd_unmerge, (b.op_out, match)),
                                "local_unmerge", site=b.index)
            b.attn_add.replace_input_with(b.op_out, back)
            if b.op == "attn":
                follow_joint_split(graph, b, x, ctx.shapes)
            if b.ids is not None:  # rotary tables at the merged tokens' positions
                follow_tables(graph, b, match, ctx.shapes)
            sites.append(MergeSite(b.index, match, x, None))
        ctx.gm.recompile()
        return sites

    def _match(self, graph, b: LocalBlock, ratio: float, step, patch: int = 1):
        """The group's match node, after its input tokens; the grid read from the graph."""
        if b.ids is not None:  # the width read at capture; the ids checked at every call
            w = b.hw[1]
            with graph.inserting_after(b.metric):
                h = inserted(graph.call_function(grid_rows, (b.ids, w)), "shape")
            with graph.inserting_after(h):
                return self._match_node(graph, b, h, w, ratio, step)
        with graph.inserting_after(b.metric):
            h = inserted(graph.call_function(torch.ops.aten.sym_size.int, (b.grid, 2)), "shape")
        with graph.inserting_after(h):
            w = inserted(graph.call_function(torch.ops.aten.sym_size.int, (b.grid, 3)), "shape")
        if patch > 1:  # the grid of p x p patches cut from it by a reshape
            with graph.inserting_after(w):
                h = inserted(graph.call_function(operator.floordiv, (h, patch)), "shape")
            with graph.inserting_after(h):
                w = inserted(graph.call_function(operator.floordiv, (w, patch)), "shape")
        with graph.inserting_after(w):
            return self._match_node(graph, b, h, w, ratio, step)

    def _match_node(self, graph, b: LocalBlock, h, w, ratio: float, step):
        args = (b.metric, h, w, self.sx, self.sy, ratio, None, self.use_rand,
                self.seed, b.group, step)
        return inserted(graph.call_function(tomesd_match, args), "merge", block=b.index,
                        method="tomesd")

    def blame(self, ctx: Context, node) -> list[int]:
        """The sites whose merged span (merge to unmerge) holds ``node``."""
        spans = {}
        for n in ctx.gm.graph.nodes:
            tag = n.meta.get("tome", {})
            if tag.get("role") in ("local_merge", "local_unmerge"):
                spans.setdefault(tag["site"], []).append(n)
        return [i for i, (start, end) in spans.items() if node in gu.between(start, end)]

    def describe(self, plan: Plan, ctx: Context) -> Plan:
        rows = tuple(dataclasses.replace(row, kind=b.op, norm="local")
                     for row, b in zip(plan.blocks, self.sites(ctx)) if b.op in self.ops)
        return dataclasses.replace(plan, blocks=rows, method="tomesd")


OPTIONS = ("ratio", "max_downsample", "sx", "sy", "use_rand", "seed", "merge_attn",
           "merge_crossattn", "merge_mlp")


def from_options(options: dict, budget: bool) -> ToMeSD:
    """The method for ``optimize(method="tomesd", **options)`` (the authors' option names and
    defaults, but ``max_downsample=None``: the finest level that has attention); one-line
    errors for unknown or bad options."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unexpected arguments for method='tomesd': {', '.join(unknown)}")
    ratio = options.get("ratio")
    if budget and ratio is not None:
        raise ValueError("pass either ratio or flops_budget, not both")
    if not budget and ratio is None:
        raise ValueError("method='tomesd' needs ratio=... or flops_budget=...")
    flags = {f"merge_{op}": options.get(f"merge_{op}", op == "attn") for op in OPS}
    max_ds, sx, sy = options.get("max_downsample"), options.get("sx", 2), options.get("sy", 2)
    use_rand, seed = options.get("use_rand", True), options.get("seed")
    check_args(ratio, max_ds, sx, sy, use_rand, seed, flags)
    if seed is None:  # a fresh pattern per module, reproducible under torch.manual_seed
        seed = int(torch.randint(0, 1 << 31, ())) if use_rand else 0
    ops = tuple(op for op in OPS if flags[f"merge_{op}"])
    return ToMeSD(0.0 if ratio is None else ratio, max_ds, ops, sx, sy, use_rand, seed)
