"""ToDo's key/value reduction (Smith et al. 2024, "ToDo: Token Downsampling for Efficient
Generation of High-Resolution Images", arXiv 2402.13573).

The keys and values of a self-attention are computed from fewer tokens: the ``h x w`` grid of
its input downsampled (``todo_downsample``: a pool or ``F.interpolate`` to ``new_h x new_w``),
or merged by ToMeSD's bipartite matching (``todo_similarity``, ``kernels.tomesd``). Queries keep
every token, so nothing is unmerged.

Both take tokens on dim -2 (``[B, N, C]``, or SDPA's ``[B, heads, N, d]``) and reduce only
``[start, start + frames*h*w)``: text tokens of joint attention before or after the image
tokens pass through, and each frame of a video is reduced on its own (frames go into the batch).
With ``sizes=True`` they also return ``[..., N', 1]``: how many input tokens each output token
stands for (1 for tokens passed through), for proportional attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .tomesd import tomesd_match, tomesd_merge

POOLS = ("max_pool", "avg_pool")


def _split(x: torch.Tensor, h: int, w: int, start: int, frames: int, only: bool = False):
    """(tokens before, the grids ``[B', h*w, C]`` with frames in the batch, tokens after);
    ``only``: every token is the grid's (nothing before or after)."""
    lead, n, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    flat = x.reshape(-1, n, c)
    if only:
        return lead, None, flat.reshape(-1, h * w, c), None
    end = start + frames * h * w
    grid = flat[:, start:end].reshape(-1, h * w, c)  # [B'*frames, h*w, C]
    return lead, flat[:, :start], grid, flat[:, end:]


def _join(lead, before, grid, after, size_of_grid=None):
    b, c = math.prod(lead), grid.shape[-1]
    out = grid.reshape(b, -1, c)
    if before is not None:
        out = torch.cat([before, out, after], 1)
    out = out.reshape(*lead, out.shape[1], c)
    if size_of_grid is None:
        return out
    size = size_of_grid.reshape(b, -1, 1).to(grid.dtype)
    if before is not None:
        ones = lambda t: t.new_ones(t.shape[0], t.shape[1], 1)  # noqa: E731
        size = torch.cat([ones(before), size, ones(after)], 1)
    return out, size.reshape(*lead, size.shape[1], 1)


def _resize(img: torch.Tensor, new_h: int, new_w: int, method: str, factor) -> torch.Tensor:
    """``img`` ``[B, C, h, w]`` at ``new_h x new_w``. A pool with an integer ``factor`` is the
    authors' (kernel = stride = factor); without one (a budget's real-valued factor), adaptive."""
    if method in POOLS:
        if factor is not None:
            pool = F.max_pool2d if method == "max_pool" else F.avg_pool2d
            return pool(img, kernel_size=factor, stride=factor)
        pool = F.adaptive_max_pool2d if method == "max_pool" else F.adaptive_avg_pool2d
        return pool(img, (new_h, new_w))
    return F.interpolate(img, size=(new_h, new_w), mode=method)


def todo_downsample(x: torch.Tensor, h: int, w: int, new_h: int, new_w: int, method: str,
                    start: int = 0, frames: int = 1, factor: int | None = None,
                    sizes: bool = False, only: bool = False):
    """``x`` with its ``h x w`` grid tokens (row-major, per frame) resized to ``new_h x new_w``
    by ``method`` (``"max_pool"``, ``"avg_pool"`` or an ``F.interpolate`` mode)."""
    lead, before, grid, after = _split(x, h, w, start, frames, only)
    c = grid.shape[-1]
    img = grid.transpose(1, 2).reshape(-1, c, h, w)
    small = _resize(img, new_h, new_w, method, factor)
    out = small.reshape(-1, c, new_h * new_w).transpose(1, 2)
    if not sizes:
        return _join(lead, before, out, after)
    each = out.new_full(out.shape[:2], 1.0) * ((h * w) / (new_h * new_w))
    return _join(lead, before, out, after, each)


def todo_similarity(x: torch.Tensor, h: int, w: int, sx: int = 2, sy: int = 2,
                    ratio: float = 0.5, use_rand: bool = False, seed: int = 0, salt: int = 0,
                    step: torch.Tensor | None = None, start: int = 0, frames: int = 1,
                    sizes: bool = False, only: bool = False):
    """``x`` with ``int(h*w*ratio)`` grid tokens of each frame averaged into their most similar
    window destination (ToMeSD's bipartite matching on ``x`` itself). ``use_rand`` is off for an
    odd batch, as the authors do (a prompt and its unconditional twin share no batch then)."""
    lead, before, grid, after = _split(x, h, w, start, frames, only)
    rand = use_rand and grid.shape[0] % 2 == 0
    match = tomesd_match(grid, h, w, sx, sy, ratio, None, rand, seed, salt, step)
    out = tomesd_merge(grid, match)
    if not sizes:
        return _join(lead, before, out, after)
    each = out.new_ones(out.shape[:2]) if match is None else match[1]
    return _join(lead, before, out, after, each)
