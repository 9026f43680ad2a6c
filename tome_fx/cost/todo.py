"""ToDo's rewrite, its FLOPs and the budget search.

ToDo keeps every query, so a self-attention's FLOPs are linear in its kept key count ``K``
(``QK^T`` and ``AV``: ``2*B*heads*N*K*(d_qk + d_v)``; the key and value projections
``2*B*K*C*(d_k + d_v)``), and the model's FLOPs are the original's plus, per reduced site,
``slope * (K - N)``. The slope of each site is measured: one run of the graph with every
site reduced, node by node (``run_flops``), the nodes between the reduction and the attention.
The budget is met in the branch the steps take: the downsample branch where any step takes it
(the authors' defaults: the first 80%), else the similarity branch, whose kept count is any
integer down to one key per window, and whose matching adds FLOPs of its own per level (an
intercept, measured with the slope from two merge ratios).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
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
    """FLOPs as ``original - sum over levels slope[l] * (tokens[l] - kept[l])``, plus
    ``overhead[l]`` for each level reduced at all (similarity matching)."""

    original: float
    grid: dict  # ToDo level -> (h, w) at the example inputs
    slope: dict  # ToDo level -> FLOPs per key removed (every site of the level together)
    overhead: dict = field(default_factory=dict)  # level -> FLOPs a reduction adds
    least: dict = field(default_factory=dict)  # level -> fewest keys kept by similarity merging

    def flops(self, kept: dict) -> float:
        total = self.original
        for lv, (h, w) in self.grid.items():
            k = kept.get(lv, h * w)
            total -= self.slope[lv] * (h * w - k)
            total += self.overhead.get(lv, 0.0) if k < h * w else 0.0
        return total

    def options(self, level: int) -> list[tuple[int, int | None, int | None]]:
        """(kept, rows, columns) ascending: grids for downsampling, any count for similarity."""
        h, w = self.grid[level]
        if level in self.least:
            return [(k, None, None) for k in range(self.least[level], h * w + 1)]
        return _grids(h, w)


def build_cost(captured: Captured, method: ToDo) -> KeyCost:
    """Measured in ``method.branch``: the model's FLOPs unchanged, and with each level's keys
    reduced in turn (``run_flops``, the graph as rewritten): downsampled by 2 on the rows, or
    (similarity) merged at two ratios, which gives the matching's intercept too."""
    inputs = (captured.args, captured.kwargs)
    base = rewrite(captured, dataclasses.replace(method, branch="none"), prop_attn=False,
                   drop=False)
    sites = [b for b in base.blocks if isinstance(b, LocalBlock)]
    original = sum(run_flops(base.graph_module, inputs).flops.values())

    def measure(lv: int, factor=1.0, ratio: float = 0.0) -> float | None:
        one = lambda v, off: tuple(v if i + 1 == lv else off for i in range(2))  # noqa: E731
        probe = dataclasses.replace(method, factor=one(factor, 1.0), ratio=one(ratio, 0.0))
        rw = rewrite(captured, probe, prop_attn=False, drop=False)
        if not kv_removed(rw.graph_module, *inputs):  # every site of the level refused
            return None
        return sum(run_flops(rw.graph_module, inputs).flops.values())

    grid, slope, overhead, least = {}, {}, {}, {}
    for ds, lv in ToDo.levels(sites).items():
        h, w = next(b.hw for b in sites if b.downsample == ds)
        if method.branch == "similarity":
            n, fewest = h * w, (h // method.sy) * (w // method.sx)
            r1, r2 = (n - fewest) // 4, (n - fewest) // 2
            f1, f2 = (measure(lv, ratio=(r + 0.5) / n) for r in (r1, r2))
            if f1 is None or f2 is None or r2 <= r1:
                continue
            slope[lv] = (f1 - f2) / (r2 - r1)
            overhead[lv], least[lv] = f1 - original + slope[lv] * r1, fewest
        else:
            fewer = measure(lv, factor=(2.0, 1.0))  # rows only
            if fewer is None:
                continue
            slope[lv] = (original - fewer) / (h * w - (h // 2) * w)  # factor 2 on the rows
        grid[lv] = (h, w)
    return KeyCost(original, grid, slope, overhead, least)


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


def search_grids(cost: KeyCost, budget: float) -> dict[int, tuple[int, int | None, int | None]]:
    """Level -> (kept, rows, columns) with the FLOP ratio in [budget - 0.01, budget]: level 1
    alone where it can, else the fewest reductions of level 2 with which some grid of level 1
    lands, level 1 then kept as large as it can. ValueError naming the least reachable ratio."""
    b = check_budget(budget)
    top, low = b * cost.original, (b - 0.01) * cost.original
    levels = sorted(cost.grid)
    if not levels:
        raise ValueError("flops_budget: no self-attention's keys can be reduced")
    options = {lv: cost.options(lv) for lv in levels}
    first, second = levels[0], (levels[1:] or [None])[0]
    full = {lv: options[lv][-1] for lv in levels}  # every key kept
    # level 2 as little as possible (the authors leave it whole): its grid steps are coarse,
    # so a budget level 1's grids step over is met with level 2's mildest reduction that lands,
    # not with level 1 kept large and level 2 cut hard (14x14 + 4x4 of 8x8: 2.5x the noise's
    # per-step error of 13x14 + 7x7 at budget 0.9 on the CIFAR-10 UNet, benchmarks/diffusion)
    for o2 in reversed(options[second]) if second is not None else [None]:
        for o1 in reversed(options[first]):
            chosen = {**full, first: o1, **({second: o2} if o2 else {})}
            if low <= cost.flops({lv: k for lv, (k, _, _) in chosen.items()}) <= top:
                return chosen
    least = cost.flops({lv: options[lv][0][0] for lv in levels}) / cost.original
    if least > b:
        fewest = "one key per window" if cost.least else "one token"
        raise ValueError(f"flops_budget={budget:g} is below the least reachable FLOP ratio "
                         f"{least:.4f} for ToDo (keys and values of levels 1 and 2 down to "
                         f"{fewest}); pass flops_budget >= {math.ceil(least * 1e4) / 1e4}")
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
        (h, w), (k, nh, nw) = cost.grid[lv], chosen[lv]
        if nh is not None:
            factor[lv - 1] = (Fraction(h, nh), Fraction(w, nw))
        # a level kept whole is not rewritten (a match that merges nothing still costs FLOPs)
        ratio[lv - 1] = min((h * w - k + 0.5) / (h * w), 0.999) if k < h * w else 0.0
    kept = {lv: k for lv, (k, _, _) in chosen.items()}
    where = ", ".join(f"level {lv} " + (f"{nh}x{nw}" if nh else f"{k} keys")
                      + f" of {cost.grid[lv][0]}x{cost.grid[lv][1]}"
                      for lv, (k, nh, nw) in sorted(chosen.items()))
    other = ("; the similarity branch keeps as many keys where its windows allow"
             if method.branch == "downsample" else "")
    note = (f"flops_budget={budget:g}: kept {where} (FLOP ratio "
            f"{cost.flops(kept) / cost.original:.4f} in the {method.branch} branch{other})")
    return dataclasses.replace(method, factor=tuple(factor), ratio=tuple(ratio),
                               notes=(*method.notes, note))
