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
from ..kernels.tomesd import tomesd_match, tomesd_merge, tomesd_unmerge
from ..passes.base import Context, inserted
from ..passes.merge import MergeSite
from ..plans import Plan
from .local import NO_GRID, OPS, LocalBlock, find_local, step_input, values_of

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
        blocks, refusals = find_local(ctx.gm, ctx.shapes, m.cores)
        if not blocks:
            reasons = sorted({r.reason for r in refusals}, key=lambda r: (r == NO_GRID, r))
            why = "; ".join(reasons) or "no attention"
            raise ValueError(f"method='tomesd' needs {NO_SITES}: {why}")
        m.blocks, m.refusals, m.cross = blocks, refusals, []
        refused = {}
        for b in blocks:
            h, w = b.hw
            if h < self.sy or w < self.sx:
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
                match = made[b.group] = self._match(graph, b, levels[b.downsample], step)
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
                _follow_joint_split(graph, b, x, ctx.shapes)
            sites.append(MergeSite(b.index, match, x, None))
        ctx.gm.recompile()
        return sites

    def _match(self, graph, b: LocalBlock, ratio: float, step):
        """The group's match node, after its input tokens; the grid read from the graph."""
        with graph.inserting_after(b.metric):
            h = inserted(graph.call_function(torch.ops.aten.sym_size.int, (b.grid, 2)), "shape")
        with graph.inserting_after(h):
            w = inserted(graph.call_function(torch.ops.aten.sym_size.int, (b.grid, 3)), "shape")
        args = (b.metric, h, w, self.sx, self.sy, ratio, None, self.use_rand,
                self.seed, b.group, step)
        with graph.inserting_after(w):
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


def _follow_joint_split(graph, b: LocalBlock, x, shapes) -> None:
    """MM-DiT joint attention runs on [image tokens, text tokens] and splits its output at the
    image token count, which export bakes (``out[:, :N]``, ``out[:, N:]``): the split point
    becomes the merged count, read from the merged tokens ``x``."""
    n, seen, frontier = b.tokens, set(), [b.core.out]
    count = None
    for _ in range(8):  # a few layout ops after the attention
        nxt = []
        for node in frontier:
            for u in list(node.users):
                if u in seen:
                    continue
                seen.add(u)
                s = shapes.get(node)
                if (gu.packet(u) is torch.ops.aten.slice and gu.is_tensor_shape(s) and len(s) > 1
                        and s[1] > n and gu.arg(u, 1, "dim", 0) == 1):
                    # bounds as export bakes them, or symbolic (dynamic image sizes): by value
                    start, end = (_int_value(v, shapes) for v in
                                  (gu.arg(u, 2, "start", None), gu.arg(u, 3, "end", None)))
                    start = 0 if start is None else start
                    if (start, end) == (0, n) or (start == n and (end is None or isinstance(
                            end, int) and end >= s[1])):
                        if count is None:
                            with graph.inserting_after(x):
                                count = inserted(graph.call_function(
                                    torch.ops.aten.sym_size.int, (x, 1)), "shape")
                        gu.set_arg(u, 3 if start == 0 else 2, "end" if start == 0 else "start",
                                   count)
                        u.meta["tome"] = {"role": "joint_split", "inserted": True}
                        continue
                nxt.append(u)
        frontier = nxt
    if count is None:
        return
    for cat in (b.core.query, b.core.keys, values_of(b.core)):  # [image, text] along the tokens
        if gu.is_call(cat, gu.CAT) and x in gu.ancestors_within(cat.args[0][0], 12):
            cat.meta["tome"] = {"role": "joint_cat", "inserted": True}  # the split follows it


ARITH = {operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
         operator.floordiv: operator.floordiv}


def _int_value(v, shapes, depth: int = 12):
    """The value of a slice bound: an int, or a symbolic size (dynamic image sizes) computed
    from recorded shapes; None when not known."""
    if v is None or isinstance(v, int) or not isinstance(v, fx.Node) or depth == 0:
        return v if isinstance(v, int) or v is None else None
    if v.target is torch.ops.aten.sym_size.int:
        s = shapes.get(v.args[0])
        return s[v.args[1]] if gu.is_tensor_shape(s) else None
    if v.target in ARITH and len(v.args) == 2:
        a, b = (_int_value(x, shapes, depth - 1) for x in v.args)
        return None if a is None or b is None else ARITH[v.target](a, b)
    return None


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
