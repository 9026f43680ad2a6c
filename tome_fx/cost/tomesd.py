"""ToMeSD's rewrite, at a given ratio or under a FLOP budget."""
from __future__ import annotations

from ..capture import Captured
from ..methods.tomesd import ToMeSD
from ..pipeline import Rewrite, rewrite


def rewrite_tomesd(captured: Captured, method: ToMeSD, flops_budget: float | None = None) -> Rewrite:
    """The ToMeSD rewrite of ``captured`` (no proportional attention, nothing dropped: every op's
    output is unmerged)."""
    return rewrite(captured, method, prop_attn=False, drop=False)
