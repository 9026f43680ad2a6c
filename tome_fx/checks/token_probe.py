"""Check, by running, that a block's token dimension is the one its attention attends over.

Shapes alone cannot tell a window partition ``[B, N, C] -> [B*N/w, w, C]`` from a sequence-first
layout when the batch size equals the window size. So the stream entering the attention is
perturbed at one token and the path from it to the keys is evaluated again: in a global
attention exactly one key position changes; in windowed or regrouped attention (or when the
batch was taken for the token dimension) several do, and the block must not merge.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import graph as gu


def probe_block(interp: fx.Interpreter, block, keys: torch.Tensor) -> str | None:
    """None if perturbing one stream token changes exactly one key position, else the reason."""
    x = interp.env.get(block.stream_in)
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        return None
    tdim, j = block.token_dim, x.shape[block.token_dim] - 1
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.select(tdim, j).shape, generator=gen).to(x)
    env = {block.stream_in: x.clone()}
    env[block.stream_in].select(tdim, j).add_(noise * (1 + x.abs().max()))
    with torch.no_grad():
        for n in gu.between(block.stream_in, block.core.keys):
            args = fx.node.map_arg(n.args, lambda a: env[a] if a in env else interp.env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a] if a in env else interp.env[a])
            env[n] = getattr(interp, n.op)(n.target, args, kwargs)
    moved = env.get(block.core.keys)
    if not isinstance(moved, torch.Tensor) or moved.shape != keys.shape:
        return None
    kt = keys.dim() - 1 if block.core.keys_transposed else keys.dim() - 2
    diff = (moved - keys).abs().movedim(kt, 0).reshape(keys.shape[kt], -1).amax(dim=1)
    changed = int((diff > 1e-6 * (1 + keys.abs().max())).sum())
    if changed <= 1:
        return None
    return (f"changing one token of the stream changed the attention's keys at {changed} "
            "positions: tokens are regrouped before the attention (windows), or the batch "
            "dimension was taken for the token dimension; merging would mix them")
