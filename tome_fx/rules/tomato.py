"""ToMato: merge once, at one block's merge point, over 4-neighbour components of the patch
grid (kernel: ``kernels.tomato``)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch.fx as fx

from .. import graph as gu
from ..kernels.tomato import SIMILARITIES, tomato_merge
from ..match import Block
from ..passes.base import Context
from ..passes.merge import MergeSite, splice_merge
from ..plans import Plan

THRESHOLD_NOTE = ("threshold mode: token counts after the merge depend on the image; a batch is "
                  "padded to its largest count with size-0 tokens")
LAST_BLOCK = "the merge is in the last block, whose MLP reads every merged token"
UNCHANGED = "the model is left unchanged"


def check_args(sim_threshold, flops_budget, similarity, block, grid) -> None:
    """One-line errors for ``optimize(method="tomato", ...)``'s arguments."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if sim_threshold is None and flops_budget is None:
        raise ValueError("method='tomato' needs sim_threshold=... or flops_budget=...")
    if sim_threshold is not None and flops_budget is not None:
        raise ValueError("pass either sim_threshold or flops_budget, not both")
    if sim_threshold is not None and (isinstance(sim_threshold, bool) or
                                      not isinstance(sim_threshold, (int, float))
                                      or math.isnan(sim_threshold)):
        raise TypeError(f"sim_threshold must be a number, got {sim_threshold!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ValueError(f"block must be an int >= 0, got {block!r}")
    if grid is not None and (len(grid) != 2 or any(not isinstance(g, int) or g < 1 for g in grid)):
        raise ValueError(f"grid must be (h, w) with positive ints, got {grid!r}")


def find_grid(gm: fx.GraphModule, block: Block, shapes: dict, prefix: int) -> tuple | str:
    """(h, w) of the patch grid, or the reason it cannot be found.

    The grid is the output of the 2-D convolution (patch embedding) that feeds the token stream;
    the tokens after the prefix must be its ``h*w`` positions (flattened row-major, as
    ``flatten(2)`` of NCHW and reshapes of NHWC do).
    """
    tokens = shapes[block.merge_at][block.token_dim]
    convs = []
    for n in gu.ancestors_within(block.stream_in, 10_000):
        s = shapes.get(n)
        if gu.is_conv(gm, n) and gu.is_tensor_shape(s) and len(s) == 4:  # [B, C, h, w]
            convs.append((s[2], s[3]))
    if not convs:
        return "no 2-D patch embedding (Conv2d) feeds the tokens; pass grid=(h, w)"
    fits = {g for g in convs if g[0] * g[1] == tokens - prefix}
    if len(fits) != 1:
        return (f"{tokens} tokens with {prefix} protected do not form the patch grid "
                f"{' or '.join(f'{h}x{w}' for h, w in sorted(set(convs)))}; pass grid=(h, w)")
    return fits.pop()


def sim_source(block: Block, similarity: str):
    """(src, kind, scale) for ``tomato_merge`` from the block's attention core."""
    core = block.core
    if similarity == "keys":
        return core.keys, ("keys_t" if core.keys_transposed else "keys"), None
    if core.kind == "softmax":
        return core.anchor, "probs", None
    return (core.query, core.keys), "qk", gu.arg(core.anchor, 6, "scale", None)


@dataclass(frozen=True)
class ToMato:
    """One ToMato merge in ``block``: ``threshold`` (threshold mode) or ``r`` patch tokens
    removed per image (count mode); ``grid`` (h, w) found from the patch embedding if None."""

    block: int = 0
    grid: tuple | None = None
    similarity: str = "attention"
    threshold: float | None = None
    r: int | None = None

    @property
    def notes(self) -> tuple:
        return (THRESHOLD_NOTE,) if self.threshold is not None else ()

    def target(self, ctx: Context) -> Block:
        blocks = ctx.matches.blocks
        if self.block >= len(blocks):
            raise ValueError(f"block={self.block} but the model has {len(blocks)} rewritable "
                             "blocks")
        return blocks[self.block]

    def patch_grid(self, ctx: Context) -> tuple | str:
        """The (h, w) grid the merge works on, or why there is none."""
        block, prefix = self.target(ctx), ctx.matches.prefix
        if self.grid is None:
            return find_grid(ctx.gm, block, ctx.shapes, prefix)
        tokens = ctx.shapes[block.merge_at][block.token_dim]
        if self.grid[0] * self.grid[1] != tokens - prefix:
            raise ValueError(f"grid={tuple(self.grid)} has {self.grid[0] * self.grid[1]} "
                             f"patches but block {self.block} has {tokens} tokens with {prefix} "
                             "protected")
        return tuple(self.grid)

    def prepare(self, ctx: Context) -> dict[int, str]:
        grid = self.patch_grid(ctx)
        return {self.block: grid} if isinstance(grid, str) else {}

    def enabled(self, ctx: Context, disabled: dict, dropping: bool) -> set[int]:
        return {self.block} - set(disabled)

    def drop_blocker(self, ctx: Context, disabled: dict) -> str | None:
        """ToMato leaves the model unchanged where its merge is refused; a merge in the last
        block leaves no block after it to drop tokens in."""
        if self.block in disabled:
            return UNCHANGED
        return LAST_BLOCK if self.target(ctx) is ctx.matches.blocks[-1] else None

    def insert(self, ctx: Context, enabled: set[int]) -> list[MergeSite]:
        if self.block not in enabled or self.r == 0:
            return []
        block, prefix, grid = self.target(ctx), ctx.matches.prefix, self.patch_grid(ctx)
        src, kind, scale = sim_source(block, self.similarity)
        return [splice_merge(ctx.gm.graph, block, tomato_merge, lambda x: (
            x, src, None, self.r, prefix, grid, kind, self.threshold, scale),
            r=self.r, method="tomato")]

    def describe(self, plan: Plan, ctx: Context) -> Plan:
        grid = self.patch_grid(ctx)
        return dataclasses.replace(plan, method="tomato", merge_block=self.block,
                                   similarity=self.similarity, sim_threshold=self.threshold,
                                   grid=None if isinstance(grid, str) else grid)
