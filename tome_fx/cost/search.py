"""The schedule search: a per-block merge schedule whose FLOPs meet a budget.

Each candidate shape (constant, ramps, ...) is scaled to the least merging that meets the budget,
then adjusted block by block to land just below it; ``auto`` keeps the candidate whose outputs
drift least from the unmerged model's on the example inputs (``cost.calibrate``). See
``tome_fx.plan`` for the strategies and guarantees.
"""
from __future__ import annotations

import dataclasses
import math

from ..plans import Plan
from .calibrate import Calibration
from .model import BIG_R, CostModel

STRATEGIES = ("auto", "constant", "decreasing")

DATA_FREE = "constant"  # auto's rule without real data (benchmarks/EVAL.md, "Without real data")
DATA_FREE_NOTE = (f"auto: no calibration data, so the data-free rule ({DATA_FREE} r, free blocks "
                  f"merging the most); pass real inputs as calibration= (tome-fx: --data) to "
                  f"choose the schedule shape by output drift on them")
TOLERANCE = 0.01  # achieved ratio must be in [b - TOLERANCE, b]
_CLOSE = 0.0025  # the adjustment stops once this close below the budget


def check_budget(flops_budget) -> float:
    """``flops_budget`` as a float in (0, 1], else ValueError/TypeError naming the value."""
    if isinstance(flops_budget, bool) or not isinstance(flops_budget, (int, float)):
        raise TypeError(f"flops_budget must be a number in (0, 1], got {flops_budget!r}")
    b = float(flops_budget)
    if not (0.0 < b <= 1.0) or math.isnan(b):
        raise ValueError(f"flops_budget must be in (0, 1] (a fraction of the original FLOPs), "
                         f"got {flops_budget}")
    return b


def _shapes(num: int) -> dict[str, list[float]]:
    """Relative merge amounts per block: the candidate family for the 'auto' strategy."""
    t = [i / (num - 1) if num > 1 else 0.0 for i in range(num)]
    return {
        "constant": [1.0] * num,
        "decreasing": [2.0 * (1 - x) for x in t],  # the paper's (r, -1): 2r down to 0
        "increasing": [2.0 * x for x in t],
        "decreasing-half": [1.5 - x for x in t],
        "increasing-half": [0.5 + x for x in t],
        "front-loaded": [(1 - x) ** 2 for x in t],
        "back-loaded": [x * x for x in t],
        "skip-first-quarter": [0.0 if x < 0.25 else 1.0 for x in t],
        "skip-first-half": [0.0 if x < 0.5 else 1.0 for x in t],
        "first-half-only": [1.0 if x <= 0.5 else 0.0 for x in t],
        "middle": [1.0 - abs(2 * x - 1) for x in t],
    }


def _pin(cm: CostModel, schedule: list[int], pinned: frozenset) -> list[int]:
    """``schedule`` with the pinned blocks merging the most their token count allows."""
    return cm.clamp([BIG_R if i in pinned else r for i, r in enumerate(schedule)])


def _adjust(cm: CostModel, schedule: list[int], hi: float, close: float,
            pinned: frozenset = frozenset()) -> list[int]:
    """Single-block (and pairwise) r changes that bring the FLOPs to <= hi and close below it.

    Pinned blocks are never moved; they are re-pinned after each move (their limit depends on
    the tokens earlier blocks leave).
    """
    s = _pin(cm, schedule, pinned)
    cost = cm.flops(s)
    num = cm.num_blocks
    movable = [i for i in range(num) if i not in pinned]
    for _ in range(10 * (max(cm.counts, default=0) + num)):
        if cost <= hi and cost >= close:
            break
        moves = []
        if cost > hi:  # merge more: the single +1 that stays closest above/below hi
            for i in movable:
                t = s.copy()
                t[i] += 1
                t = _pin(cm, t, pinned)
                if t != s:
                    moves.append((cm.flops(t), t))
            under = [m for m in moves if m[0] <= hi]
            pick = max(under, key=lambda m: m[0]) if under else min(moves, key=lambda m: m[0], default=None)
        else:  # merge less: the single -1, else a (-1, +1) pair, that rises most within hi
            for i in movable:
                if s[i] > 0:
                    t = s.copy()
                    t[i] -= 1
                    t = _pin(cm, t, pinned)
                    moves.append((cm.flops(t), t))
            under = [m for m in moves if cost < m[0] <= hi]
            if not under:
                for i in movable:
                    if s[i] == 0:
                        continue
                    for j in movable:
                        if j == i:
                            continue
                        t = s.copy()
                        t[i] -= 1
                        t[j] += 1
                        t = _pin(cm, t, pinned)
                        c = cm.flops(t)
                        if cost < c <= hi:
                            under.append((c, t))
            pick = max(under, key=lambda m: m[0]) if under else None
        if pick is None:
            break
        cost, s = pick
    return s


def _fit(cm: CostModel, weights: list[float], hi: float, close: float,
         pinned: frozenset = frozenset()) -> list[int] | None:
    """Scale a shape to the least merging that meets ``hi`` FLOPs, then adjust block by block."""
    if not any(w > 0 for i, w in enumerate(weights) if i not in pinned):
        return None

    def sched(alpha: float) -> list[int]:
        return _pin(cm, [int(math.floor(alpha * w + 1e-9)) for w in weights], pinned)

    top = (max(cm.counts, default=0) + 1) / min(w for i, w in enumerate(weights) if w > 0 and i not in pinned)
    if cm.flops(sched(top)) > hi:
        return None  # this shape cannot reach the budget
    lo = 0.0
    for _ in range(60):
        mid = (lo + top) / 2
        if cm.flops(sched(mid)) <= hi:
            top = mid
        else:
            lo = mid
    return _adjust(cm, sched(top), hi, close, pinned)


def _kept(cm: CostModel) -> str:
    return (f", keeping min_tokens={cm.floor} tokens (min_tokens=0: no floor; or longer example "
            f"inputs)") if cm.floor else ""


def candidates(cm: CostModel, budget: float, strategy: str = "auto",
               notes: list | None = None, calib: Calibration | None = None,
               family: bool = True) -> dict[str, list[int]]:
    """The schedules ``search`` chooses among for a budget < 1, by name, in the FLOP window.

    ``notes``, if given, receives a line per fact the search used (free blocks). ``family``
    False: ``auto`` without real calibration data, the data-free rule (``DATA_FREE``, its free
    blocks pinned) alone.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    num = cm.num_blocks
    orig = cm.flops_original
    hi = budget * orig
    floor = cm.flops(cm.max_schedule())
    if floor > hi:
        raise ValueError(
            f"flops_budget={budget} is below the smallest reachable FLOP ratio "
            f"{floor / orig:.4f} for this model and input size (merging the most every block "
            f"allows{_kept(cm)}); pass flops_budget >= {math.ceil(floor / orig * 1e4) / 1e4}")
    close = (budget - _CLOSE) * orig
    shapes = _shapes(num)
    names = [strategy] if strategy != "auto" else list(shapes) if family else [DATA_FREE]
    pinned = (calib or Calibration(cm)).free_blocks() if strategy == "auto" else frozenset()
    if pinned and notes is not None:
        notes.append(f"auto: merging in block(s) {', '.join(map(str, sorted(pinned)))} leaves the "
                     f"calibration outputs unchanged, so every schedule merges the most there")
    fits = {}
    for name in names:
        s = _fit(cm, shapes[name], hi, close, pinned)
        fits[name] = s if s is not None else _adjust(cm, cm.max_schedule(), hi, close, pinned)
    if pinned and family:  # the free merges alone, trimmed (or topped up) to the budget
        fits["free-first"] = _adjust(cm, _pin(cm, [0] * num, pinned), hi, close)
        for name in ("constant", "decreasing"):  # unpinned too: auto never loses to these
            s = _fit(cm, shapes[name], hi, close)
            if s is not None:
                fits[name + " (unpinned)"] = s
    in_window = lambda s: cm.flops(s) >= (budget - TOLERANCE) * orig  # noqa: E731
    if not any(in_window(s) for s in fits.values()):  # keep the >= b - 0.01 guarantee
        for name in _shapes(num):
            if name not in fits:
                s = _fit(cm, shapes[name], hi, close)
                if s is not None and in_window(s):
                    fits[name] = s
                    break
    if any(in_window(s) for s in fits.values()):
        fits = {k: s for k, s in fits.items() if in_window(s)}
    unique: dict[str, list[int]] = {}
    for name, s in fits.items():
        if s not in unique.values():
            unique[name] = s
    return unique


def scored_candidates(cm: CostModel, budget: float, strategy: str = "auto",
                      notes: list | None = None, calibration: tuple | None = None,
                      family: bool = True) -> dict[str, tuple[list[int], float]]:
    """``candidates`` with each schedule's drift on ``calibration`` ((args, kwargs); default the
    example inputs): name -> (schedule, drift). Free blocks are found on the example inputs
    (a merge that cannot reach the output leaves any input's output unchanged)."""
    calib = Calibration(cm)
    scorer = calib if calibration is None else Calibration(cm, calibration)
    return {name: (s, scorer.drift(s))
            for name, s in candidates(cm, budget, strategy, notes, calib, family).items()}


def best(cm: CostModel, scored: dict[str, tuple[list[int], float]]) -> tuple[list[int], float]:
    """The least-drift (schedule, drift) of ``scored``; ties go to more FLOPs (closer to the budget)."""
    return min(scored.values(), key=lambda sd: (sd[1], -cm.flops(sd[0])))


def search(cm: CostModel, budget: float, strategy: str = "auto", notes: list | None = None,
           calibration: tuple | None = None) -> tuple[list[int], float | None]:
    """(schedule, drift) for a FLOP budget; see ``plan`` for the strategies and guarantees.

    ``auto`` chooses among its family by output drift on ``calibration`` ((args, kwargs) of
    real inputs); without them it applies the data-free rule (``DATA_FREE``) and says so in
    ``notes``: drift on random inputs does not predict accuracy (``benchmarks/EVAL.md``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if budget >= 1.0:
        return [0] * cm.num_blocks, 0.0
    if not any(cm.enabled):  # nothing can merge: the rewrite as it is (optimize warns)
        if notes is not None:
            notes.append(f"flops_budget={budget:g} is not met: no block can merge")
        return [0] * cm.num_blocks, None
    family = strategy != "auto" or calibration is not None
    if not family and notes is not None:
        notes.append(DATA_FREE_NOTE)
    scored = scored_candidates(cm, budget, strategy, notes, calibration, family)
    schedule, drift = best(cm, scored)
    if strategy == "auto" and family and notes is not None:
        name = next(k for k, (s, _) in scored.items() if s == schedule)
        notes.append(f"auto: the {name} schedule drifts least on the calibration inputs "
                     f"(of {len(scored)} shapes)")
    return schedule, drift


def to_plan(cm: CostModel, schedule: list[int], budget: float | None = None,
            strategy: str | None = None, drift: float | None = None, notes=()) -> Plan:
    """The Plan for a schedule: the max-merge rewrite's sites, with this schedule's numbers."""
    r, ins, outs = cm.flow(schedule)
    per_block, _ = cm.breakdown(r)
    rows = tuple(  # a block that drops unread tokens keeps the protected ones
        dataclasses.replace(b, r=r[i], tokens_in=ins[i],
                            tokens_out=cm.prefix if b.dropped else outs[i],
                            dropped=outs[i] - cm.prefix if b.dropped else 0,
                            flops=int(round(per_block[i])))
        for i, b in enumerate(cm.base_plan.blocks)
    )
    return dataclasses.replace(cm.base_plan, blocks=rows, flops=cm.flops(r),
                               flops_original=cm.flops_original, budget=budget,
                               strategy=strategy, drift=drift,
                               notes=cm.base_plan.notes + tuple(notes))
