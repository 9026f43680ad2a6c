"""The image grid of a model whose latent is packed into tokens before it (Flux).

Flux's transformer takes the image as tokens ``[B, N, C]`` and their grid positions as an input,
``img_ids`` ``[N, 3]`` (column 1 the row, column 2 the column, row-major, as FluxPipeline's
``_prepare_latent_image_ids`` builds them), so no ``[B, C, h, w]`` tensor is in its graph. The
grid is read from the ids' values at capture; they are values, not shapes, so the rewrite keeps
only the width and checks at every call that the ids are that grid (``kernels.tomesd.grid_rows``,
a ``ShapeError`` that makes a ``DiffusionModule`` capture the new grid).

Text tokens come before the image tokens where they share a sequence (joint attention
``cat([text, image])``, single-stream blocks): ``start`` is where the image tokens begin in the
attention's token dimension, and the kernels leave the tokens before them unmerged. A
single-stream block's attention and MLP read one normalised input and one projection takes both
outputs, so merging that input merges the MLP's image tokens too (its text tokens stay).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import graph as gu

Node = fx.Node
IDS = "img_ids"  # Flux's (and FluxPipeline's) name for the image tokens' positions
NOT_GRID = ("img_ids are not a row-major grid (column 1 the row, column 2 the column, as "
            "FluxPipeline builds them), so the image tokens have no 2-D windows")
NOT_LAST = ("the image tokens are not the last tokens of the sequence the attention runs on "
            "(text then image, as Flux joins them)")


@dataclass(frozen=True)
class IdsGrid:
    ids: Node  # the position-ids input
    hw: tuple  # (rows, columns) of the example's grid
    start: int  # first image token in the attention's token dimension
    prefix: int  # tokens before the image ones in the stream the merge takes


def ids_input(gm: fx.GraphModule, args: tuple, kwargs: dict):
    """(the ``img_ids`` input, its example value), or None."""
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    for i, p in enumerate(placeholders):
        if p.name == IDS:
            value = kwargs.get(IDS, args[i] if i < len(args) else None)
            if isinstance(value, torch.Tensor):
                return p, value
    return None


def grid_of_ids(ids: torch.Tensor) -> tuple | None:
    """(h, w) when ``ids`` ``[N, >=3]`` is the row-major grid FluxPipeline builds, else None."""
    if ids.dim() != 2 or ids.shape[1] < 3 or ids.shape[0] == 0:
        return None
    n, w = ids.shape[0], int(ids[:, 2].max()) + 1
    pos = torch.arange(n, device=ids.device)
    if n % w or not ((ids[:, 1] == pos // w).all() and (ids[:, 2] == pos % w).all()):
        return None
    return n // w, w


def image_last(node: Node, n: int, shapes, most: int = 200) -> bool:
    """Whether ``node`` is, or comes from, a concatenation along the tokens whose last part has
    the ``n`` image tokens (text before image)."""
    seen, todo = {node}, [node]
    while todo and len(seen) < most:
        x = todo.pop(0)
        if gu.is_call(x, gu.CAT) and gu.arg(x, 1, "dim", 0) in (1, -3):
            last = shapes.get(x.args[0][-1])
            if gu.is_tensor_shape(last) and len(last) > 1 and last[1] == n:
                return True
        for i in x.all_input_nodes:
            if i not in seen:
                seen.add(i)
                todo.append(i)
    return False


def find_ids_grid(gm, shapes, args, kwargs, stream: Node, query: Node) -> tuple[IdsGrid | None,
                                                                                    str]:
    """The grid of the image tokens of ``stream`` (all its tokens, or its last ones after the
    text) from the ``img_ids`` input, and where they start in the attention (``query``
    ``[..., S, D]``); else None and why not (empty when the model has no ``img_ids``)."""
    found = ids_input(gm, args, kwargs)
    if found is None:
        return None, ""
    node, value = found
    hw = grid_of_ids(value)
    if hw is None:
        return None, NOT_GRID
    n, tokens, seq = hw[0] * hw[1], shapes[stream][1], shapes[query][-2]
    if tokens < n or seq < n:
        return None, ""
    if tokens > n and not image_last(stream, n, shapes):
        return None, NOT_LAST
    if seq > n and not image_last(query, n, shapes):
        return None, NOT_LAST
    return IdsGrid(node, hw, seq - n, tokens - n), ""
