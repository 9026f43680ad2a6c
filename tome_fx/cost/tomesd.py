"""ToMeSD's FLOPs as a closed form of the per-level ratios, the budget search, and the rewrite.

Local merging changes the token count only inside the merged ops, so the model's FLOPs are the
original's plus, per merged op, the difference between its FLOPs at ``M = N - r`` tokens and at
``N`` (a polynomial of degree 2 in ``M``: linear layers and cross-attention are linear, the
self-attention product quadratic, joint attention over ``M`` image and ``T`` text tokens
``(M + T)**2``), plus each transformer block's match (its source x destination cosine-score
product; the same for any ``r > 0``). The polynomials are fitted on three runs of the model
rewritten with every op merged (``r`` = 0, half the most and the most), node by node.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .. import graph as gu
from ..capture import Captured
from ..kernels.tomesd import removed_count
from ..rules.local import LocalBlock
from ..rules.tomesd import ToMeSD
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
        return removed_count(site.tokens, h, w, self.sx, self.sy, ratio)

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


def _power(f0: float, f1: float, x0: int, x1: int) -> tuple:
    """(c, a, q) of one node's FLOPs measured at ``x0`` and ``x1`` tokens: a constant, or
    ``a*x`` or ``q*x**2`` (matrix products and attention are monomials in the token count)."""
    if f0 == f1 or x0 == x1:
        return f0, 0.0, 0.0
    if f0 > 0 and f1 > 0:
        p = round(math.log(f0 / f1) / math.log(x0 / x1))
        if p in (1, 2) and f1 * x0 ** p == f0 * x1 ** p:
            return (0.0, f0 / x0, 0.0) if p == 1 else (0.0, 0.0, f0 / x0 ** 2)
    a = (f1 - f0) / (x1 - x0)  # neither: the line through both
    return f0 - a * x0, a, 0.0


def _fit(points: list[tuple[int, float]]) -> tuple:
    """(c, a, q) through one node's FLOPs at three token counts: exact for any polynomial of
    degree 2, such as joint attention over ``M + T`` tokens (MM-DiT: ``(M + T)**2`` has a
    linear and a constant term, which a monomial or a chord through two points misprices);
    with two distinct counts, ``_power``."""
    pts = sorted(dict(points).items())
    if len(pts) < 3:
        (x0, f0), (x1, f1) = pts[-1], pts[0]
        return _power(f0, f1, x0, x1)
    (x0, f0), (x1, f1), (x2, f2) = pts[0], pts[len(pts) // 2], pts[-1]
    d01, d12 = (f1 - f0) / (x1 - x0), (f2 - f1) / (x2 - x1)
    q = (d12 - d01) / (x2 - x0)
    a = d01 - q * (x0 + x1)
    return f0 - a * x0 - q * x0 * x0, a, q


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
    most = {group_of[s.group]: removed_count(s.tokens, *s.hw, method.sx, method.sy, 0.0, BIG)
            for s in sites}
    runs = [run_flops(gm, inputs, {m: r * k // 2 for m, r in most.items()}) for k in (0, 1, 2)]
    plain, merged = runs[0], runs[-1]
    poly, match = {}, {}
    for s in sites:
        m = group_of[s.group]
        terms = [_fit([(s.tokens - most[m] * k // 2, run.flops.get(n, 0))
                       for k, run in enumerate(runs)]) for n in spans[s.index]]
        poly[s.index] = tuple(float(sum(t[i] for t in terms)) for i in range(3))
        match[s.group] = merged.flops.get(m, 0)
    return LocalCost(sum(plain.flops.values()), sites, poly, match, method.sx, method.sy)


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


def level_plans(sites: list[LocalBlock], levels: dict, merged: set, method: ToMeSD,
                cost: LocalCost | None) -> tuple[LevelPlan, ...]:
    """One row per level of ``sites``; FLOPs where ``cost`` prices the level's ops, else None."""
    per = cost.by_level(levels) if cost is not None else {}
    out = []
    for ds in sorted({s.downsample for s in sites}):
        here = [s for s in sites if s.downsample == ds]
        ratio = levels.get(ds, 0.0)
        r = removed_count(here[0].tokens, *here[0].hw, method.sx, method.sy, ratio)
        before, after = per.get(ds, (None, None))
        out.append(LevelPlan(ds, here[0].hw, ratio, r, sum(s.index in merged for s in here),
                             None if before is None else int(round(before)),
                             None if after is None else int(round(after))))
    return tuple(out)


def rewrite_tomesd(captured: Captured, method: ToMeSD, flops_budget: float | None = None) -> Rewrite:
    """The ToMeSD rewrite of ``captured`` at ``method``'s ratios, or at the per-level ratios that
    meet ``flops_budget`` (no proportional attention and nothing dropped: every op's output is
    unmerged). The plan lists the levels with their FLOPs. A ratio that merges nothing is a
    ValueError saying why."""
    cost = None
    if flops_budget is not None:  # priced on every level, at the most each allows
        every = dataclasses.replace(method, ratio=RECOMMENDED, max_downsample=BIG)
        cost = build_cost(captured, rewrite(captured, every, prop_attn=False, drop=False), method)
        method = dataclasses.replace(method, ratio=search_levels(cost, flops_budget,
                                                                 method.max_downsample))
    rw = rewrite(captured, method, prop_attn=False, drop=False)
    sites = [b for b in rw.blocks if isinstance(b, LocalBlock) and b.op in method.ops]
    levels = method.levels(sites)
    merged = {row.index for row in rw.plan.blocks if row.r > 0}
    if merged:
        cost = cost or build_cost(captured, rw, method)
        rw.plan = dataclasses.replace(rw.plan, flops=int(round(cost.flops(levels))),
                                      flops_original=int(round(cost.original)))
    rw.plan = dataclasses.replace(rw.plan, budget=flops_budget, levels=level_plans(
        sites, levels, merged, method, cost if merged else None))
    rw.graph_module.tome = rw.plan
    asked = method.ratio.values() if isinstance(method.ratio, dict) else [method.ratio]
    if not merged and any(asked):  # asked to merge: say why it cannot
        raise ValueError(f"method='tomesd' merges nothing in {captured.model_class}: "
                         f"{nothing_merged(rw.plan, method)}")
    return rw


def nothing_merged(plan, method: ToMeSD) -> str:
    """Why a ToMeSD plan that asks for merging merges nothing (one line, what to change)."""
    window = [s.reason for s in plan.skipped if "window" in s.reason]
    if window:
        return window[0]
    have = ", ".join(str(lv.downsample) for lv in plan.levels)
    if not any(lv.ratio > 0 for lv in plan.levels):
        return (f"its transformer blocks are at downsample {have}, above max_downsample="
                f"{method.max_downsample}; pass max_downsample={plan.levels[0].downsample} or more")
    ops = {row.site for row in plan.blocks}  # an op's own reason before other refusals
    first = next((s for s in plan.skipped if s.site in ops), plan.skipped[0] if plan.skipped
                 else None)
    return f"{first.site}: {first.reason}" if first else "no op of the chosen kinds merges"
