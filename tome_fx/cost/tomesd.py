"""ToMeSD's FLOPs as a closed form of the per-level ratios, the budget search, and the rewrite.

Local merging changes the token count only inside the merged ops, so the model's FLOPs are the
original's plus, per merged op, the difference between its FLOPs at ``M = N - r`` tokens and at
``N`` (a polynomial of degree 2 in ``M``: linear layers and cross-attention are linear, the
self-attention product quadratic), plus each transformer block's match (its source x
destination cosine-score product; the same for any ``r > 0``). The polynomials are fitted on
three runs of the model rewritten with every op merged (``r`` = 0, the most, half of it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .. import graph as gu
from ..capture import Captured
from ..kernels.tomesd import merge_count
from ..methods.local import LocalBlock
from ..methods.tomesd import ToMeSD
from ..pipeline import Rewrite, rewrite
from ..plans import LevelPlan
from .flops import run_flops
from .search import check_budget

RECOMMENDED = 0.5  # the authors' recommended most; a budget goes past it only on every level
BIG = 1 << 30


@dataclass
class LocalCost:
    """FLOPs of a model under ToMeSD as a function of its per-level ratios (see module doc)."""

    original: float  # FLOPs of the model as given, for the example inputs' batch
    sites: list[LocalBlock]  # the ops that can merge
    poly: dict[int, tuple]  # site -> (c, a, q): the op's FLOPs at M tokens = c + a*M + q*M^2
    match: dict[int, float]  # group -> FLOPs of its match (when it merges)
    sx: int
    sy: int

    def r(self, site: LocalBlock, ratio: float) -> int:
        h, w = site.hw
        return merge_count(site.tokens, h, w, self.sx, self.sy, ratio)

    def op_flops(self, site: LocalBlock, tokens: int) -> float:
        c, a, q = self.poly[site.index]
        return c + a * tokens + q * tokens * tokens

    def by_level(self, levels: dict) -> dict[int, tuple[float, float]]:
        """Downsample level -> FLOPs of its ops (as given, with ``levels``' ratios)."""
        out: dict[int, list] = {}
        matched: set[int] = set()
        for s in self.sites:
            r = self.r(s, levels.get(s.downsample, 0.0))
            level = out.setdefault(s.downsample, [0.0, 0.0])
            level[0] += self.op_flops(s, s.tokens)
            level[1] += self.op_flops(s, s.tokens - r)
            if r > 0 and s.group not in matched:
                matched.add(s.group)
                level[1] += self.match[s.group]
        return {ds: (v[0], v[1]) for ds, v in out.items()}

    def flops(self, levels: dict) -> float:
        return self.original + sum(after - before for before, after in self.by_level(levels).values())

    def downsamples(self) -> list[int]:
        return sorted({s.downsample for s in self.sites})


def _fit(xs: list[int], ys: list[float]) -> tuple:
    """(c, a, q) of the quadratic through three points; fewer distinct points: lower degree."""
    pts = sorted(set(zip(xs, ys)))
    if len({x for x, _ in pts}) < 3:
        (x0, y0), (x1, y1) = pts[0], pts[-1]
        a = 0.0 if x1 == x0 else (y1 - y0) / (x1 - x0)
        return y0 - a * x0, a, 0.0
    q, a, c = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 2)
    return float(c), float(a), float(q)


def _spans(gm) -> dict[int, set]:
    """Site -> the nodes between its merge and its unmerge."""
    ends: dict[int, dict] = {}
    for n in gm.graph.nodes:
        tag = n.meta.get("tome", {})
        if tag.get("role") in ("local_merge", "local_unmerge"):
            ends.setdefault(tag["site"], {})[tag["role"]] = n
    return {i: set(gu.between(e["local_merge"], e["local_unmerge"])) for i, e in ends.items()}


def build_cost(captured: Captured, rw: Rewrite, method: ToMeSD) -> LocalCost:
    """The cost model of the ops ``rw`` (a ToMeSD rewrite of ``captured``) merges."""
    gm, inputs = rw.graph_module, (captured.args, captured.kwargs)
    matches = {m.meta["tome"]["block"]: m for m in gu.merge_nodes(gm)}
    spans = _spans(gm)
    sites = [b for b in rw.blocks if isinstance(b, LocalBlock) and b.index in spans]
    group_of = {s.group: next(matches[t.index] for t in sites
                              if t.group == s.group and t.index in matches) for s in sites}
    most = {group_of[s.group]: merge_count(s.tokens, *s.hw, method.sx, method.sy, 0.0, BIG)
            for s in sites}
    runs = [run_flops(gm, inputs, {m: r * k // 2 for m, r in most.items()}) for k in (0, 2, 1)]
    poly, match = {}, {}
    for s in sites:
        m = group_of[s.group]
        xs = [s.tokens - most[m] * k // 2 for k in (0, 2, 1)]
        ys = [sum(f for n, f in run.flops.items() if n in spans[s.index]) for run in runs]
        poly[s.index] = _fit(xs, ys)
        match[s.group] = runs[1].flops.get(m, 0)
    return LocalCost(sum(runs[0].flops.values()), sites, poly, match, method.sx, method.sy)


def _candidates(cost: LocalCost, levels: list[int], cap: float) -> list[float]:
    """Uniform ratios in (0, cap] at which some level's r changes, ascending."""
    found = set()
    for s in cost.sites:
        if s.downsample in levels:
            for k in range(1, int(s.tokens * cap) + 1):
                found.add((k + 0.5) / s.tokens if (k + 0.5) / s.tokens <= cap else cap)
    return sorted(found)


def search_levels(cost: LocalCost, budget: float, top: int | None = None) -> dict[int, float]:
    """Per-level ratios meeting ``budget``: the finest level first, at most the recommended
    ratio 0.5, then the next level too at the same ratio; past 0.5 only with every level in.
    The least uniform ratio whose FLOPs are within the budget, so the ratio lands just below
    it. ValueError naming the smallest reachable ratio when none meets it."""
    b = check_budget(budget)
    target = b * cost.original
    have = [ds for ds in cost.downsamples() if top is None or ds <= top]
    if not have:
        raise ValueError("flops_budget: no level has an op to merge")
    most = 1 - 1 / (cost.sx * cost.sy)
    tries = [(have[:k], RECOMMENDED) for k in range(1, len(have) + 1)] + [(have, most)]
    for levels, cap in tries:
        for ratio in _candidates(cost, levels, cap):
            chosen = {ds: ratio for ds in levels}
            if cost.flops(chosen) <= target:
                return chosen
    least = cost.flops({ds: most for ds in have}) / cost.original
    raise ValueError(f"flops_budget={budget:g} is below the smallest reachable FLOP ratio "
                     f"{least:.4f} for ToMeSD with these ops (ratio {most:.2f} on every level); "
                     f"merge more ops (merge_crossattn=True, merge_mlp=True) or pass "
                     f"flops_budget >= {math.ceil(least * 1e4) / 1e4}")


def level_plans(cost: LocalCost, sites: list[LocalBlock], levels: dict) -> tuple[LevelPlan, ...]:
    """One row per level of ``sites``: FLOPs where ``cost`` prices its ops, else None."""
    per = cost.by_level(levels)
    out = []
    for ds in sorted({s.downsample for s in sites}):
        site = next(s for s in sites if s.downsample == ds)
        ratio = levels.get(ds, 0.0)
        ops = sum(1 for s in cost.sites if s.downsample == ds and cost.r(s, ratio) > 0)
        before, after = per.get(ds, (None, None))
        out.append(LevelPlan(ds, site.hw, ratio, cost.r(site, ratio), ops,
                             None if before is None else int(round(before)),
                             None if after is None else int(round(after))))
    return tuple(out)


def rewrite_tomesd(captured: Captured, method: ToMeSD, flops_budget: float | None = None) -> Rewrite:
    """The ToMeSD rewrite of ``captured`` at ``method``'s ratios, or at the per-level ratios that
    meet ``flops_budget`` (no proportional attention and nothing dropped: every op's output is
    unmerged). The plan lists the levels with their FLOPs."""
    if flops_budget is not None:  # priced on every level, at the most each allows
        every = dataclasses.replace(method, ratio=RECOMMENDED, max_downsample=BIG)
        full = rewrite(captured, every, prop_attn=False, drop=False)
        levels = search_levels(build_cost(captured, full, method), flops_budget,
                               method.max_downsample)
        method = dataclasses.replace(method, ratio=levels)
    rw = rewrite(captured, method, prop_attn=False, drop=False)
    cost = build_cost(captured, rw, method)
    sites = [b for b in rw.blocks if isinstance(b, LocalBlock) and b.op in method.ops]
    levels = method.levels(sites)
    rw.plan = dataclasses.replace(rw.plan, levels=level_plans(cost, sites, levels),
                                  flops=int(round(cost.flops(levels))),
                                  flops_original=int(round(cost.original)), budget=flops_budget)
    rw.graph_module.tome = rw.plan
    return rw
