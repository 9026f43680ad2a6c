"""Insert one ToMato merge at a chosen block's merge point (between attention residual and MLP)."""
from __future__ import annotations

import torch.fx as fx

from .. import graph_utils as gu
from ..match import Block
from ..tomato import tomato_merge
from .base import PassResult, finish
from .merge import splice_merge


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


def insert_tomato(gm: fx.GraphModule, block: Block, prefix: int, grid: tuple, similarity: str,
                  threshold, r) -> PassResult:
    """One ``tomato_merge`` after ``block``'s attention residual; every use of the merge point
    sees the merged tokens. ``r`` None: threshold mode; int: patch tokens removed."""
    src, kind, scale = sim_source(block, similarity)
    site = splice_merge(gm.graph, block, tomato_merge, lambda x: (
        x, src, None, r, prefix, tuple(grid), kind, threshold, scale), r=r, method="tomato")
    return PassResult(finish(gm), 1, [site])
