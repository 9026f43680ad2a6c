"""ToDo's rewrite, its FLOPs and the budget search.

ToDo keeps every query, so a self-attention's FLOPs are linear in its kept key count ``K``
(``QK^T`` and ``AV``: ``2*B*heads*N*K*(d_qk + d_v)``; the key and value projections
``2*B*K*C*(d_k + d_v)``), and the model's FLOPs are the original's plus, per reduced site,
``slope * (K - N)``. The slope of each site is measured: one run of the graph with every
site reduced, node by node (``run_flops``), the nodes between the reduction and the attention.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

from ..capture import Captured
from ..rules.local import LocalBlock
from ..rules.todo import ToDo, kv_removed
from ..pipeline import Rewrite, rewrite
from .flops import run_flops
from .search import check_budget


def rewrite_todo(captured: Captured, method: ToDo, price: bool = True) -> Rewrite:
    """The ToDo rewrite of ``captured`` in ``method``'s branch; ``counts["kv_reduce"]``: the
    self-attentions whose keys and values are reduced. ``price``: the plan's FLOPs, counted on
    the example inputs (one run of the captured and one of the rewritten graph)."""
    rw = rewrite(captured, method, prop_attn=False, drop=False)
    if price:
        inputs = (captured.args, captured.kwargs)
        original, after = (sum(run_flops(gm, inputs).flops.values())
                           for gm in (captured.graph_module, rw.graph_module))
        rw.plan = dataclasses.replace(rw.plan, flops=int(after), flops_original=int(original))
    n = sum(1 for x in rw.graph_module.graph.nodes
            if x.meta.get("tome", {}).get("role") == "kv_reduce"
            and x.meta["tome"].get("site") is not None)
    rw.counts["kv_reduce"] = len({x.meta["tome"]["site"] for x in rw.graph_module.graph.nodes
                                  if x.meta.get("tome", {}).get("role") == "kv_reduce"})
    rw.counts["kv_calls"] = n
    rw.graph_module.tome = rw.plan
    return rw


@dataclass
class KeyCost:
    """FLOPs as ``original - sum over levels slope[l] * (tokens[l] - kept[l])``."""

    original: float
    grid: dict  # ToDo level -> (h, w) at the example inputs
    slope: dict  # ToDo level -> FLOPs per key removed (every site of the level together)

    def flops(self, kept: dict) -> float:
        return self.original - sum(self.slope[lv] * (h * w - kept.get(lv, h * w))
                                   for lv, (h, w) in self.grid.items())


def build_cost(captured: Captured, method: ToDo) -> KeyCost:
    """Measured: the model's FLOPs unchanged, and with each level's keys reduced by 2 per side
    in turn (``run_flops``, the graph as rewritten)."""
    inputs = (captured.args, captured.kwargs)
    base = rewrite(captured, dataclasses.replace(method, branch="none"), prop_attn=False,
                   drop=False)
    sites = [b for b in base.blocks if isinstance(b, LocalBlock)]
    levels = ToDo.levels(sites)
    original = sum(run_flops(base.graph_module, inputs).flops.values())
    grid, slope = {}, {}
    for ds, lv in levels.items():
        hw = next(b.hw for b in sites if b.downsample == ds)
        grid[lv] = hw
        factor = tuple((2.0, 1.0) if i + 1 == lv else (1.0, 1.0) for i in range(2))
        probe = dataclasses.replace(method, branch="downsample", factor=factor)
        rw = rewrite(captured, probe, prop_attn=False, drop=False)
        if not kv_removed(rw.graph_module, *inputs):  # every site of the level refused: no slope
            continue
        fewer = sum(run_flops(rw.graph_module, inputs).flops.values())
        removed = hw[0] * hw[1] - (hw[0] // 2) * hw[1]  # factor 2 on the rows
        slope[lv] = (original - fewer) / removed
    return KeyCost(original, {lv: grid[lv] for lv in slope}, slope)


def _grids(h: int, w: int) -> list[tuple[int, int, int]]:
    """(kept, rows, columns) of the smaller grids of about the ``h x w`` aspect (columns within
    one of ``rows * w / h``), ascending: the kept count moves in steps of about one row."""
    out = {}
    for nh in range(1, h + 1):
        centre = nh * w / h
        for nw in range(max(1, math.floor(centre) - 1), min(w, math.ceil(centre) + 1) + 1):
            if abs(nw - centre) <= 1:
                out.setdefault(nh * nw, (nh, nw))
    return sorted((k, nh, nw) for k, (nh, nw) in out.items())


def search_grids(cost: KeyCost, budget: float) -> dict[int, tuple[int, int]]:
    """Level -> kept (rows, columns) with the FLOP ratio in [budget - 0.01, budget]: level 1
    alone where it can, else level 1 with the fewest reductions of level 2. ValueError naming
    the least reachable ratio."""
    b = check_budget(budget)
    top, low = b * cost.original, (b - 0.01) * cost.original
    levels = sorted(cost.grid)
    if not levels:
        raise ValueError("flops_budget: no self-attention's keys can be reduced")
    options = {lv: _grids(*cost.grid[lv]) for lv in levels}
    chosen = {lv: cost.grid[lv] for lv in levels}
    first, second = levels[0], (levels[1:] or [None])[0]
    for k1, nh1, nw1 in reversed(options[first]):  # level 1 alone
        if low <= cost.flops({first: k1}) <= top:
            return {**chosen, first: (nh1, nw1)}
    if second is not None:  # level 1 as little as level 2 allows, level 2 as little as needed
        kept2 = [k for k, _, _ in options[second]]
        n2, s2 = math.prod(cost.grid[second]), cost.slope[second]
        for k1, nh1, nw1 in reversed(options[first]):
            base = cost.flops({first: k1})
            most = n2 - (base - top) / s2 if s2 > 0 else -1
            i = bisect.bisect_right(kept2, most) - 1
            if i >= 0 and cost.flops({first: k1, second: kept2[i]}) >= low:
                _, nh2, nw2 = options[second][i]
                return {first: (nh1, nw1), second: (nh2, nw2)}
    least = cost.flops({lv: 1 for lv in levels}) / cost.original
    if least > b:
        raise ValueError(f"flops_budget={budget:g} is below the least reachable FLOP ratio "
                         f"{least:.4f} for ToDo (keys and values of levels 1 and 2 down to one "
                         f"token); pass flops_budget >= {math.ceil(least * 1e4) / 1e4}")
    raise ValueError(f"flops_budget={budget:g}: no kept grid lands in [{b - 0.01:g}, {b:g}]")


def fit_budget(captured: Captured, method: ToDo, budget: float) -> ToDo:
    """``method`` with each level's factor (rows, columns) from ``search_grids`` at the example
    inputs' grids, and the similarity ratios keeping as many keys."""
    cost = build_cost(captured, method)
    chosen = search_grids(cost, budget)
    factor, ratio = list(method.factor), list(method.ratio)
    for lv in (1, 2):
        if lv not in chosen:
            factor[lv - 1], ratio[lv - 1] = 1.0, 0.0
            continue
        (h, w), (nh, nw) = cost.grid[lv], chosen[lv]
        factor[lv - 1] = (Fraction(h, nh), Fraction(w, nw))
        ratio[lv - 1] = min((h * w - nh * nw + 0.5) / (h * w), 0.999)
    kept = {lv: nh * nw for lv, (nh, nw) in chosen.items()}
    note = (f"flops_budget={budget:g}: kept grids "
            + ", ".join(f"level {lv} {nh}x{nw} of {cost.grid[lv][0]}x{cost.grid[lv][1]}"
                        for lv, (nh, nw) in sorted(chosen.items()))
            + f" (FLOP ratio {cost.flops(kept) / cost.original:.4f}"
            " in the downsample branch; the similarity branch keeps as many keys where its "
            "windows allow)")
    return dataclasses.replace(method, factor=tuple(factor), ratio=tuple(ratio),
                               notes=(*method.notes, note))
