"""ToMe: merge ``r`` token pairs in every block (bipartite soft matching on the keys)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..kernels.tome import tome_merge
from ..passes.base import Context
from ..passes.merge import MergeSite, splice_merge
from ..plans import Plan


@dataclass(frozen=True)
class ToMe:
    schedule: Callable[[int], list[int]]  # number of blocks -> r per block
    notes: tuple = ()

    def prepare(self, ctx: Context) -> dict[int, str]:
        return {}

    def enabled(self, ctx: Context, disabled: dict, dropping: bool) -> set[int]:
        """Every block not switched off; when the unread tokens are dropped, not the last one
        (its merge could not reach the output)."""
        blocks = ctx.matches.blocks
        on = {b.index for b in blocks} - set(disabled)
        if dropping:
            on.discard(blocks[-1].index)
        return on

    def drop_blocker(self, ctx: Context, disabled: dict) -> str | None:
        return None

    def insert(self, ctx: Context, enabled: set[int]) -> list[MergeSite]:
        """A ``tome_merge`` in each enabled block with r > 0; ``size`` threads from merge to
        merge, so every use of a merge point sees merged tokens."""
        schedule, size, sites = self.schedule(len(ctx.matches.blocks)), None, []
        prefix = ctx.matches.prefix
        for block in ctx.matches.blocks:
            r = schedule[block.index]
            if r <= 0 or block.index not in enabled:
                continue
            keys, transposed = block.core.keys, block.core.keys_transposed
            site = splice_merge(ctx.gm.graph, block, tome_merge,
                                lambda x: (x, keys, size, r, prefix, transposed), r=r)
            size = site.size
            sites.append(site)
        return sites

    def describe(self, plan: Plan, ctx: Context) -> Plan:
        return plan
