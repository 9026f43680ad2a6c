"""ToMe: merge ``r`` token pairs in every block (bipartite soft matching on the keys)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from .. import graph as gu
from ..kernels.tome import merge_limit, tome_merge
from ..passes.base import Context, inserted
from ..passes.merge import MergeSite, splice_merge
from ..plans import Plan


@dataclass(frozen=True)
class ToMe:
    schedule: Callable[[int], list[int]]  # number of blocks -> r per block
    notes: tuple = ()
    # True: the schedule's r are counts at the example token count, and each block merges the
    # same share of its tokens at any count (``kernels.tome.merge_count``); False: r as given
    scales: bool = False
    unmerge: str | bool = "auto"  # where merged tokens go back to the original layout

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
        merge of one token stream (``Block.stream``: each tower of CLIP its own), so every use
        of a merge point sees merged tokens."""
        schedule, sites = self.schedule(len(ctx.matches.blocks)), []
        prefix = ctx.matches.prefix
        streams: dict[int, _Stream] = {}  # each token stream threads its own sizes and counts
        for block in ctx.matches.blocks:
            r = schedule[block.index]
            if r <= 0 or block.index not in enabled:
                continue
            arg, st = r, streams.setdefault(block.stream, _Stream())
            if self.scales:  # (kept, of): see kernels.tome.merge_count
                if st.tokens is None:  # the first merge: its tokens are ``of``
                    st.tokens = st.of = ctx.shapes[block.merge_at][block.token_dim]
                st.tokens -= min(r, merge_limit(st.tokens, prefix))
                arg = (st.tokens, st.of)
            keys, transposed, size = block.core.keys, block.core.keys_transposed, st.size
            site = splice_merge(ctx.gm.graph, block, tome_merge,
                                lambda x: (x, keys, size, arg, prefix, transposed), r=r)
            if self.scales and st.first is not None:
                st.start = st.start or _start_count(ctx.gm.graph, st.first)
                gu.set_merge_arg(site.merge, "start", st.start)
            st.size, st.first = site.size, st.first or site
            sites.append(site)
        return sites

    def describe(self, plan: Plan, ctx: Context) -> Plan:
        return dataclasses.replace(plan, scales=True) if self.scales else plan


@dataclass
class _Stream:
    """What the merges of one token stream thread from one to the next."""

    size: object = None  # the latest merge's sizes
    first: MergeSite | None = None
    start: object = None  # ``_start_count`` of the first merge
    tokens: int | None = None  # tokens left (``scales``)
    of: int = 0  # tokens entering the first merge


def _start_count(graph, first: MergeSite):
    """A node holding the token count that enters the first merge (``merge_count``'s start)."""
    x = gu.merge_arg(first.merge, "x")
    with graph.inserting_before(first.merge):
        return inserted(graph.call_function(torch.ops.aten.sym_size.int, (x, 1)), "shape")
